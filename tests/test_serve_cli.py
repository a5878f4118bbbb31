"""`gptedge serve` as users run it (a subprocess): GPTEDGE_API_KEY, and SIGTERM closes the listening
socket at once, lets an open stream finish, then the process exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from serve_helpers import chat_bundle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_open_stream_and_exits_0(tmp_path_factory):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GPTEDGE_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "gptedge.runtime.cli", "serve", str(chat_bundle(tmp_path_factory)),
                             "--port", str(port), "--max-batch", "4"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from GPTEDGE_API_KEY
        body = {"prompt": "w1 w2", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        signalled = threading.Event()

        def read_stream() -> list[str]:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": "Bearer k1"}) as r:
                lines = []
                for line in r.iter_lines():
                    if line and not lines:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                        signalled.set()
                    if line:
                        lines.append(line)
                        time.sleep(0.002)  # a slow reader keeps the stream open for ~2 s
                return lines

        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(read_stream)
            assert signalled.wait(30)
            deadline = time.monotonic() + 5
            while True:  # the listening socket closes at once; the open stream goes on
                try:
                    httpx.get(url + "/health", timeout=1)
                except httpx.ConnectError:
                    break
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.02)
            assert not reading.done()
            lines = reading.result(timeout=60)
        assert lines[-1] == "data: [DONE]" and '"completion_tokens": 1000' in lines[-2]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
