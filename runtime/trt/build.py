# Reviewed against (API review without hardware, 2026-11; TensorRT never ran in our CI):
# - TensorRT Python API 10.x (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/
#   Builder.html, BuilderConfig, OnnxParser, TimingCache) and its pybind sources (python/src/infer/pyCore.cpp,
#   python/src/parsers/pyOnnx.cpp): create_network(1 << STRONGLY_TYPED) (EXPLICIT_BATCH ignored since 10.0),
#   OnnxParser.parse_from_file (-> bool; resolves external data beside the file), str(get_error(i)),
#   set_shape(name, min, opt, max) (raises RuntimeError if inconsistent), set_memory_pool_limit(WORKSPACE,
#   bytes), create_timing_cache(buffer)/set_timing_cache(cache, ignore_mismatch) -> bool,
#   build_serialized_network -> IHostMemory | None.
# - TensorRT 10.x -> 11.x migration guide, "Removed Python APIs" (.../api/migration/
#   tensorrt-10x-to-11x-python-api-reference.html): weak typing (BuilderFlag.FP16/INT8/...), calibrators and
#   quantization flags are removed; STRONGLY_TYPED is kept but ignored. None of the removed APIs is used here.
"""``gptedge build``: a TensorRT engine from the bundle's graph, stored in ``<bundle>/engines/``.

The network is created strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, present
since TensorRT 10.0, ignored-but-accepted in 11.x where strong typing is always on), so every
tensor keeps the dtype the ONNX graph gives it: an fp16 bundle builds fp16 kernels, a Q/DQ int8
bundle int8 ones. No FP16/INT8 builder flags and no calibrator: those are weak typing, deprecated in
10.12 and removed in 11.0. ``tensorrt`` is imported inside functions only.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptedge.runtime import __version__
from gptedge.runtime.bundle import Bundle, load_bundle
from gptedge.runtime.errors import BackendUnavailableError, BundleError, EngineError, InputError
from gptedge.runtime.trt import engine_cache as ec
from gptedge.runtime.trt.lint import lint_bundle
from gptedge.runtime.trt.plan import (
    DEFAULT_WORKSPACE_MB,
    GB,
    Target,
    describe_misfit,
    generation_graph,
    plan_memory,
)
from gptedge.runtime.trt.profiles import Profile, engine_profiles, profiles_signature

log = logging.getLogger(__name__)

TENSORRT_HINT = ("tensorrt is not installed (on a Jetson it comes with JetPack; see README 'Jetson'); "
                 "on a desktop: pip install 'tensorrt>=10.3'")
GRAPHS = ("auto", "model_last", "model")


@dataclass(frozen=True)
class BuildConfig:
    """Options of one engine build.

    ``target``: a name from plan.TARGETS for the memory check, or None to check against this GPU's
    free memory. ``max_batch``/``max_context``: profile maxima (rows, tokens; None = the bundle's
    max_context). ``workspace_mb``: builder tactic scratch limit. ``timing_cache``: file reused across
    builds (None = ``engines/timing-<trt>-sm<cc>.cache``). ``graph``: ``auto`` (model_last when
    present and portable), ``model_last`` or ``model`` (full logits, needed for scoring).
    """

    target: str | None = None
    max_batch: int = 1
    max_context: int | None = None
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: Path | None = None
    graph: str = "auto"
    memory_gb: float | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise InputError(f"--max-batch {self.max_batch}: must be >= 1")
        if self.workspace_mb < 16:
            raise InputError(f"--workspace {self.workspace_mb}: give at least 16 MB")
        if self.graph not in GRAPHS:
            raise InputError(f"--graph {self.graph}: choose one of {', '.join(GRAPHS)}")


@dataclass(frozen=True)
class BuildResult:
    path: Path
    key: ec.EngineKey
    seconds: float
    reused: bool


def import_tensorrt() -> Any:
    """``tensorrt`` (>= 10), or BackendUnavailableError with the install hint."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(TENSORRT_HINT) from exc
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {tensorrt.__version__} found; gptedge needs TensorRT >= 10.3 "
                                      "(JetPack 6.1 or newer on a Jetson)")
    return tensorrt


@functools.cache
def trt_logger(trt: Any) -> Any:
    """The one ``trt.Logger`` of this process. TensorRT keeps the first logger given to a Builder or
    Runtime for the whole process and warns when a later one differs, and the logger must outlive
    every object created with it: so builder and runtimes share this one, held for the process."""
    return trt.Logger(trt.Logger.WARNING)


def resolve_graph(bundle: Bundle, graph: str = "auto") -> tuple[str, Path]:
    """(role, path) of the graph to build; refuses a non-portable (onnxruntime-only) graph."""
    if bundle.manifest.cpu_only:
        raise BundleError(f"{bundle.path}: this bundle is cpu_only (onnxruntime-specific operators); "
                          "TensorRT cannot build it — quantize for TensorRT or use the fp32/fp16 bundle")
    role, path = generation_graph(bundle) if graph == "auto" else (graph, bundle.path / bundle.manifest.files.get(
        graph, {"path": "model.onnx"})["path"])
    entry = bundle.manifest.files.get(role, {})
    if not entry.get("portable", True) or not path.is_file():
        raise BundleError(f"{path}: graph '{role}' is missing or not portable; use --graph model")
    return role, path


def current_environment(trt: Any) -> tuple[ec.Environment, Any]:
    from gptedge.runtime.trt.cuda_mem import gpu_info

    gpu = gpu_info()
    return ec.Environment(str(trt.__version__), gpu.name, gpu.compute_capability), gpu


def build_engine(bundle_dir: str | os.PathLike[str], config: BuildConfig = BuildConfig()) -> BuildResult:
    """Lint, check the memory plan, then build and store the engine (or reuse an identical one)."""
    bundle = load_bundle(bundle_dir)
    role, graph_path = resolve_graph(bundle, config.graph)
    trt = import_tensorrt()
    env, gpu = current_environment(trt)
    report = lint_bundle(bundle.path, env.trt_version)
    if not report.ok:
        first = "; ".join(f"{f.graph} {f.node}: {f.message}" for f in report.errors[:3])
        raise EngineError(f"{len(report.errors)} node(s) TensorRT {env.trt_version} cannot parse ({first}); "
                          f"see `gptedge lint {bundle.path} --trt {env.trt_version}`")
    target = config.target or Target("this-gpu", gpu.name, (gpu.free_bytes / GB,), 0.0, None, env.trt_version)
    memory_plan = plan_memory(bundle.path, target, config.max_context, config.max_batch,
                              config.workspace_mb, config.memory_gb, role=role)
    if not memory_plan.fits():
        raise EngineError(f"the engine would not fit: {describe_misfit(memory_plan)}; lower --max-context "
                          "or --max-batch, or use a smaller precision bundle")
    arch = bundle.manifest.architecture
    profiles = engine_profiles(arch, config.max_batch, config.max_context)
    precision = f"weights={bundle.manifest.precision.get('weights')};kv={bundle.manifest.kv_cache_dtype}"
    key = ec.EngineKey.create(env, precision, role, profiles_signature(profiles), ec.onnx_sha256(graph_path))
    path = ec.engine_dir(bundle.path) / key.filename
    if path.is_file() and not config.force:
        log.info("engine %s already built", path)
        return BuildResult(path, key, 0.0, True)
    cache_path = config.timing_cache or ec.engine_dir(bundle.path) / (
        f"timing-trt{env.trt_version}-sm{env.compute_capability}.cache")
    start = time.perf_counter()
    plan = _build_serialized(trt, graph_path, profiles, config.workspace_mb, cache_path)
    seconds = time.perf_counter() - start
    options = {"target": config.target, "max_batch": config.max_batch,
               "max_context": config.max_context or arch.max_context,
               "graph": None if config.graph == "auto" else config.graph}
    meta = {"key": asdict(key), "options": options, "gptedge": __version__, "built_at": time.time(),
            "build_seconds": round(seconds, 2), "max_context": options["max_context"],
            "max_batch": config.max_batch}
    ec.write_engine(path, meta, plan)
    return BuildResult(path, key, seconds, False)


def network_flags(trt: Any) -> int:
    """``create_network`` flags: STRONGLY_TYPED (bit 1 in 10.x, where bit 0 is the ignored EXPLICIT_BATCH;
    bit 0 in 11.x, where the flag is deprecated because strong typing is always on). Taken by name, so
    the bit is right for each version; 0 if a later release drops the flag."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _parse(trt: Any, builder: Any, logger: Any, graph_path: Path) -> Any:
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves model.onnx.data next to the graph (external weights).
    if not parser.parse_from_file(str(graph_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"{graph_path}: TensorRT's ONNX parser failed: {' | '.join(errors[:5])}")
    return network, parser


def _build_serialized(trt: Any, graph_path: Path, profiles: list[Profile], workspace_mb: int,
                      cache_path: Path) -> memoryview:
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, graph_path)
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profiles[0].shapes):
        raise EngineError(f"{graph_path}: inputs {sorted(names)} do not follow the gptedge contract "
                          f"({sorted(profiles[0].shapes)}); re-export the bundle")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s is from another device/TensorRT; starting a new one", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {graph_path} (see the TensorRT log "
                          "above); out of memory is the usual cause: lower --max-context or --workspace")
    ec.write_bytes_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    return memoryview(serialized)
