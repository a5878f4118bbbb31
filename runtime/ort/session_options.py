"""onnxruntime session settings of the backend: thread count, spin-waiting and optimization level."""

from __future__ import annotations

import os

import onnxruntime as ort


def session_options(threads: int) -> ort.SessionOptions:
    """Options for a generation session on ``threads`` intra-op threads (one inter-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not _spinning(threads):
        # Idle pool threads sleep instead of spin-waiting. A decode step is hundreds of tiny
        # ops; with spinning, a thread sharing its core with any other work burns the time
        # the busy thread needs: 1.7-1.9x slower decode at load ~3 on 2 vCPUs. On an idle
        # machine spinning is 4-13 % faster, hence the load check (benchmarks/NOTES.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _spinning(threads: int) -> bool:
    """Whether the thread pool may spin-wait: GPTEDGE_ORT_SPINNING=1/0 decides; otherwise only
    when the CPUs our threads need are idle (1-minute load average + threads <= CPUs + 0.5)."""
    forced = os.environ.get("GPTEDGE_ORT_SPINNING")
    if forced in ("0", "1"):
        return forced == "1"
    if threads <= 1 or not hasattr(os, "getloadavg"):
        return True
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return os.getloadavg()[0] + threads <= cpus + 0.5


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyperthreads do not speed up matmuls)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return max(1, allowed)
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            cores.add((physical, value.strip()))
    return max(1, min(allowed, len(cores) or allowed))
