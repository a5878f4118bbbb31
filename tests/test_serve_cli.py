"""`gptedge serve` as users run it (a subprocess): GPTEDGE_API_KEY, and SIGTERM lets an open stream
finish, then the process exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
        body = {"prompt": "w1 w2", "max_tokens": 600, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}

        def read_stream() -> list[str]:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": "Bearer k1"}) as r:
                lines = []
                for line in r.iter_lines():
                    if line and len(lines) == 0:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                    if line:
                        lines.append(line)
                return lines

        with ThreadPoolExecutor(1) as pool:
            lines = pool.submit(read_stream).result(timeout=60)
        assert lines[-1] == "data: [DONE]" and '"completion_tokens": 600' in lines[-2]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
