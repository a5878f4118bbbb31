"""Start a real ``tritonserver`` (the binary and python backend of the ``nvidia-pytriton`` wheel) on
loopback, for tests. It needs a venv made with Debian's own ``python3`` package: the python-backend
stub is linked against the system ``libpython3.11`` and fails under other 3.11 builds (pyenv:
``'_thread.RLock' object has no attribute '_recursion_count'``). Set it up once (README, Triton):

    /usr/bin/python3 -m venv ~/.cache/gptedge/triton-venv
    ~/.cache/gptedge/triton-venv/bin/pip install nvidia-pytriton numpy onnx onnxruntime tokenizers jinja2

``GPTEDGE_TRITON_VENV`` points elsewhere. Nothing is installed into that venv: the python-backend
stub ignores PYTHONPATH and takes its environment from the ``python3`` first on PATH, so each
server gets a throwaway venv (no pip: ~0.1 s) whose ``.pth`` file adds that venv's packages and a
folder of links that imports as this checkout's ``gptedge``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(os.environ.get("GPTEDGE_TRITON_VENV", "~/.cache/gptedge/triton-venv")).expanduser()
ROOT = Path(__file__).resolve().parents[1]
SETUP = (f"/usr/bin/python3 -m venv {VENV} && {VENV}/bin/pip install nvidia-pytriton numpy onnx onnxruntime "
         "tokenizers jinja2")
PACKAGES = {"runtime": "runtime", "quantize": "quantize", "exporter": "exporter"}


def _python_version() -> str:
    """The venv's Python version ("3.11"), from its lib folder (it need not be the tests' own)."""
    found = sorted((VENV / "lib").glob("python3.*"))
    return found[0].name.removeprefix("python") if found else f"{sys.version_info.major}.{sys.version_info.minor}"


def _site_packages() -> Path:
    return VENV / "lib" / f"python{_python_version()}" / "site-packages"


def unavailable() -> str | None:
    """Why the server cannot start here (None: it can)."""
    cfg = VENV / "pyvenv.cfg"
    if not cfg.is_file():
        return f"no Debian-python venv with nvidia-pytriton at {VENV}; create it with: {SETUP}"
    home = next((line.split("=", 1)[1].strip() for line in cfg.read_text().splitlines()
                 if line.startswith("home")), "")
    if home not in ("/usr/bin", "/bin"):
        return (f"{VENV} was made with {home}/python3, not Debian's /usr/bin/python3: tritonserver's python-backend "
                "stub fails there ('_thread.RLock' object has no attribute '_recursion_count'); recreate it: "
                f"{SETUP}")
    server = _site_packages() / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not server.is_file():
        return f"{server} missing (nvidia-pytriton not installed in {VENV}); {SETUP}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backends(work: Path) -> Path:
    """A backend folder: the python backend with the stub for this Python version."""
    dist = _site_packages() / "pytriton" / "tritonserver"
    python = work / "backends" / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python / name).symlink_to(dist / "backends" / "python" / name)
    shutil.copy(dist / "python_backend_stubs" / _python_version() / "triton_python_backend_stub", python)
    return work / "backends"


def _overlay_venv(work: Path) -> Path:
    """A venv of Debian's python that sees the Triton venv's packages and this checkout's gptedge
    (through a folder of links to its three package folders); returns its ``bin``."""
    package = work / "pythonpath" / "gptedge"
    package.mkdir(parents=True)
    for name, folder in PACKAGES.items():
        (package / name).symlink_to(ROOT / folder)
    overlay = work / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(overlay)], check=True)
    pth = overlay / "lib" / f"python{_python_version()}" / "site-packages" / "gptedge-checkout.pth"
    pth.write_text(f"{_site_packages()}\n{work / 'pythonpath'}\n", encoding="utf-8")
    return overlay / "bin"


class TritonServer:
    """``with TritonServer(repo, work) as server:`` serves ``repo`` on loopback; ``server.grpc_url``."""

    def __init__(self, repository: Path, work: Path, timeout_s: float = 90.0) -> None:
        self.repository, self.work, self.timeout_s = repository, work, timeout_s
        self.grpc_url = ""
        self.process: subprocess.Popen | None = None
        self.log = work / "tritonserver.log"

    def __enter__(self) -> TritonServer:
        grpc_port = _free_port()
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        env = dict(os.environ)
        libs = str(_site_packages() / "nvidia_pytriton.libs")
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH"), libs) if p)
        env["PATH"] = f"{_overlay_venv(self.work)}:{env['PATH']}"
        command = [str(_site_packages() / "pytriton" / "tritonserver" / "bin" / "tritonserver"),
                   "--model-repository", str(self.repository), "--backend-directory", str(_backends(self.work)),
                   "--allow-http", "false", "--allow-metrics", "false", "--grpc-address", "127.0.0.1",
                   "--grpc-port", str(grpc_port), "--log-verbose", "0"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"tritonserver not ready after {self.timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
