"""Every example runs as a script, with tiny sizes, chained: 01 exports what 02-04 use."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import gptedge.runtime as gptedge_runtime

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("examples")
    out = run_example("01_export.py", "--tiny", "--steps", "30", "--out", "bundles/tiny", cwd=cwd)
    assert "exported" in out and "parity max-abs" in out
    return cwd / "bundles" / "tiny"


def test_01_export_writes_a_bundle_from_a_trained_checkpoint(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["source"]["format"] == "nanogpt" and manifest["parity"]["passed"]
    assert manifest["tokenizer"]["kind"] == "char"
    assert (tiny_bundle.parent / "tiny-ckpt" / "ckpt.pt").is_file()


def test_02_quantize(tiny_bundle):
    out = run_example("02_quantize.py", str(tiny_bundle), "--max-tokens", "2000", cwd=tiny_bundle.parent)
    assert "int8:" in out and "int4:" in out
    for name in ("tiny-int8", "tiny-int4"):
        assert json.loads((tiny_bundle.parent / name / "manifest.json").read_text())["precision"]["weights"] != "float32"


def test_03_generate(tiny_bundle):
    out = run_example("03_generate.py", str(tiny_bundle), "--prompt", "def ", "--max-new-tokens", "20",
                      cwd=tiny_bundle.parent)
    assert out.startswith("def ") and "tok/s" in out and "greedy:" in out and "mean log-prob" in out


def test_04_embed_in_app_streams_over_http(tiny_bundle):
    server = subprocess.Popen([sys.executable, str(EXAMPLES / "04_embed_in_app.py"), str(tiny_bundle), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = server.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line + server.stderr.read()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/generate", body=json.dumps({"prompt": "def ", "max_new_tokens": 24}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
        chunks = []
        while chunk := response.read1(4096):
            chunks.append(chunk.decode("utf-8"))
        conn.close()
        with gptedge_runtime.load(tiny_bundle) as generator:  # the same greedy text, in process
            expected = generator.generate("def ", max_new_tokens=24).text
        assert "".join(chunks) == expected and expected
        bad = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        bad.request("POST", "/generate", body="{}")
        assert bad.getresponse().status == 400
        bad.close()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
            server.stdout.close()
            server.stderr.close()
