"""``gptedge triton``: write a Triton Inference Server model repository for a bundle.

Three kinds of model, one per call (a repository may hold several: each goes in ``REPO/<name>``):

- ``python``: a decoupled python-backend model wrapping the gptedge runtime (text in, streamed text
  and token ids out). The version folder holds ``model.py`` and the bundle (a copy, or a link).
  The Triton python environment needs ``pip install gptedge``.
- ``onnx``: the bundle's portable generation graph as an ``onnxruntime_onnx`` step model.
- ``tensorrt``: an engine made by ``gptedge build`` as a ``tensorrt_plan`` step model (the plan
  bytes without gptedge's header; it runs only on the GPU and TensorRT version that built it).

Step models run one forward pass per request and keep the KV cache in Triton (implicit state, see
:mod:`gptedge.runtime.triton.config`); :mod:`gptedge.runtime.triton.step_client` drives them.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gptedge.runtime.bundle import Bundle, atomic_output_dir, load_bundle
from gptedge.runtime.errors import BundleError, EngineError, InputError
from gptedge.runtime.triton import config as cfg

log = logging.getLogger(__name__)

KINDS = ("python", "onnx", "tensorrt")
DEVICES = ("cpu", "gpu")
VERSION = "1"
BUNDLE_FOLDER = "bundle"  # the python model's bundle, inside the version folder
MODEL_PY = '''"""Triton python-backend model written by `gptedge triton`: the gptedge runtime on the bundle
beside this file. The Triton python environment needs `pip install gptedge`."""

from gptedge.runtime.triton.python_model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class TritonConfig:
    """Options of one model written into a repository.

    ``kind``: python, onnx or tensorrt (see the module doc). ``name``: the model's folder and
    Triton name. ``instances``: model instances (each one process / session). ``device``: where
    the python and onnx models' instances run (``cpu``/``gpu``; TensorRT is always gpu).
    ``max_batch``: step models: sequences per execution (TensorRT: at most the engine's).
    ``max_sequences``: step models: sequences an instance keeps KV state for at once.
    ``link``: python: symlink the bundle instead of copying it. ``backend``/``threads``: python:
    the gptedge backend (``auto``, ``ort-cpu`` ...) and CPU threads inside the model.
    ``engine``: tensorrt: the engine file (default: the newest for the generation graph).
    """

    kind: str = "python"
    name: str = "gptedge"
    instances: int = 1
    device: str = "cpu"
    max_batch: int | None = None
    max_sequences: int = 8
    link: bool = False
    backend: str = "auto"
    threads: int | None = None
    engine: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"--kind {self.kind}: choose one of {', '.join(KINDS)}")
        if self.device not in DEVICES:
            raise InputError(f"--device {self.device}: choose cpu or gpu")
        if self.instances < 1:
            raise InputError(f"--instances {self.instances}: must be >= 1")
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError(f"--max-batch {self.max_batch}: must be >= 1")
        if self.max_sequences < 1:
            raise InputError(f"--max-sequences {self.max_sequences}: must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads {self.threads}: must be >= 1")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise InputError(f"--name {self.name!r}: give a plain folder name")


def write_repository(bundle_dir: str | os.PathLike[str], config: TritonConfig,
                     repository: str | os.PathLike[str]) -> Path:
    """Write model ``config.name`` of ``config.kind`` for the bundle into ``repository`` (created if
    needed; other models in it are left alone). Returns the model folder. OutputExistsError when the
    model folder exists and ``config.overwrite`` is not set."""
    bundle = load_bundle(bundle_dir)
    writer = {"python": _write_python, "onnx": _write_onnx, "tensorrt": _write_tensorrt}[config.kind]
    model_dir = Path(repository) / config.name
    with atomic_output_dir(model_dir, config.overwrite) as tmp:
        (tmp / VERSION).mkdir()
        text = writer(bundle, config, tmp / VERSION)
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
    log.info("wrote Triton model %s (%s)", model_dir, config.kind)
    return model_dir.absolute()


def _instances(config: TritonConfig, profiles: tuple[int, ...] = ()) -> cfg.Instances:
    gpu = config.device == "gpu" or config.kind == "tensorrt"
    return cfg.Instances(config.instances, "KIND_GPU" if gpu else "KIND_CPU", profiles)


def _write_python(bundle: Bundle, config: TritonConfig, version_dir: Path) -> str:
    (version_dir / "model.py").write_text(MODEL_PY, encoding="utf-8")
    target = version_dir / BUNDLE_FOLDER
    if config.link:
        os.symlink(bundle.path.resolve(), target, target_is_directory=True)
    else:
        shutil.copytree(bundle.path, target, symlinks=False)
    params = {"gptedge_bundle": BUNDLE_FOLDER, "gptedge_backend": config.backend}
    if config.threads is not None:
        params["gptedge_threads"] = str(config.threads)
    return cfg.python_model_config(config.name, _instances(config), params)


def _write_onnx(bundle: Bundle, config: TritonConfig, version_dir: Path) -> str:
    from gptedge.runtime.onnx_io import external_data_locations
    from gptedge.runtime.trt.plan import generation_graph

    role, graph = generation_graph(bundle)  # the portable graph: Triton's onnxruntime has no gptedge variant
    for name in [graph.name, *external_data_locations(graph)]:
        dest = version_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(graph.parent / name, dest)
    arch = bundle.manifest.architecture
    return cfg.step_model_config(config.name, "onnxruntime_onnx", arch, bundle.manifest.kv_cache_dtype,
                                 1 if role == "model_last" else None, config.max_batch or 1,
                                 _instances(config), graph.name, config.max_sequences)


def _write_tensorrt(bundle: Bundle, config: TritonConfig, version_dir: Path) -> str:
    from gptedge.runtime.trt import engine_cache as ec
    from gptedge.runtime.trt.profiles import DECODE, PREFILL

    path = config.engine or _newest_engine(bundle)
    meta, plan = ec.read_plan(Path(path))
    built_batch = int(meta.get("max_batch", 1))
    if config.max_batch is not None and config.max_batch > built_batch:
        raise InputError(f"--max-batch {config.max_batch}: the engine {path} was built for at most {built_batch} "
                         f"rows; rebuild with `gptedge build {bundle.path} --max-batch {config.max_batch}`")
    if int(meta.get("max_context", 0)) < bundle.manifest.architecture.max_context:
        log.warning("engine %s holds %s tokens of the bundle's %d", path, meta.get("max_context"),
                    bundle.manifest.architecture.max_context)
    (version_dir / "model.plan").write_bytes(plan)
    role = meta["key"].get("role")
    return cfg.step_model_config(config.name, "tensorrt_plan", bundle.manifest.architecture,
                                 bundle.manifest.kv_cache_dtype, 1 if role == "model_last" else None,
                                 config.max_batch or built_batch, _instances(config, (PREFILL, DECODE)),
                                 "model.plan", config.max_sequences)


def _newest_engine(bundle: Bundle) -> Path:
    from gptedge.runtime.trt import engine_cache as ec
    from gptedge.runtime.trt.plan import generation_graph

    role, _graph = generation_graph(bundle)
    found = sorted(ec.engine_dir(bundle.path).glob(f"{role}-*.engine"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise EngineError(f"no TensorRT engine for '{role}' in {ec.engine_dir(bundle.path)}; build one on the "
                          f"Triton server's GPU with `gptedge build {bundle.path}`, or pass --engine")
    return found[-1]


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link where the file system allows one (weights can be gigabytes), else a copy."""
    if not src.is_file():
        raise BundleError(f"{src}: missing; copy the whole bundle folder again")
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
