"""HuggingFace folders (``config.json`` + safetensors / ``pytorch_model.bin``) → :class:`LoadedCheckpoint`.

Each ``model_type`` has a family mapping (``hf_<family>.py``, looked up in :mod:`hf_config`): its
config mapping and refusals, and the rules that rename the weights onto the decoder's parameters
(see ``gptedge.exporter.model``): GPT-2's Conv1D weights are stored ``[in, out]`` and are
transposed; separate q/k/v and gate/up projections are concatenated into the fused ``attn.qkv`` and
``mlp.gate_up``. The transformers parity reference lives in :mod:`hf_reference`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from gptedge.exporter.chat_template import read_hf_chat_template
from gptedge.exporter.checkpoints import LoadedCheckpoint, torch_load_reason
from gptedge.exporter.checkpoints.hf_config import (
    architecture_from_config,
    export_context,
    family_of,
    read_config,
)
from gptedge.exporter.checkpoints.hf_family import Family
from gptedge.exporter.checkpoints.hf_reference import transformers_reference
from gptedge.exporter.checkpoints.hf_tokenizer import load_tokenizer
from gptedge.exporter.config import ExportConfig
from gptedge.exporter.genai_config import GENAI_CONFIG_NAME, genai_config_bytes
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError, UnsupportedModelError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COPIED_FILES = ("config.json", "generation_config.json")
# decoder tensors fused from several checkpoint tensors, and how many parts each has
_PARTS = {"attn.qkv": 3, "mlp.gate_up": 2}


def load_hf(folder: Path, config: ExportConfig) -> LoadedCheckpoint:
    """Read an HF model folder: its config, weights (fp32), tokenizer and side files.

    Raises :class:`UnsupportedModelError` for configs the decoder does not implement and
    :class:`InputError` for missing, truncated or mismatching files.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    arch = architecture_from_config(cfg, folder / "config.json", config.max_context)
    weight_files, raw = read_weights(folder)
    family = family_of(cfg, folder / "config.json")
    state_dict = map_state_dict(family, cfg["model_type"], raw, arch, folder)
    del raw
    tokenizer = load_tokenizer(folder, cfg, config)
    extra_files = {name: (folder / name).read_bytes() for name in COPIED_FILES if (folder / name).is_file()}
    genai_type = family.genai_type(cfg["model_type"])
    if genai_type is not None:
        extra_files[GENAI_CONFIG_NAME] = genai_config_bytes(
            arch, genai_type, export_context(cfg, config.max_context), tokenizer.info if tokenizer else None)
    reference = transformers_reference(folder, family.reference_attention(cfg))
    source = {"format": "hf", "path": str(folder), "model_type": cfg["model_type"],
              "weight_files": [p.name for p in weight_files],
              "config_sha256": hashlib.sha256(extra_files["config.json"]).hexdigest(),
              "reference": "transformers" if reference else "gptedge decoder (transformers not installed)"}
    template_dir = config.tokenizer if config.tokenizer and config.tokenizer.is_dir() else \
        (config.tokenizer.parent if config.tokenizer else folder)
    return LoadedCheckpoint(arch=arch, state_dict=state_dict, source=source, tokenizer=tokenizer,
                            extra_files=extra_files, reference=reference,
                            chat_template=read_hf_chat_template(template_dir))


def read_weights(folder: Path) -> tuple[list[Path], dict[str, torch.Tensor]]:
    """The weight files of ``folder`` and all their tensors (original dtypes).

    Looks for, in order: ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin`` (loaded with ``weights_only=True``).
    """
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            files = _shards(folder / index_name)
            break
        if (folder / single_name).is_file():
            files = [folder / single_name]
            break
    else:
        raise InputError(f"{folder}: no weights found (model.safetensors, model.safetensors.index.json or "
                         "pytorch_model.bin); is the download complete?")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(_read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path))
    return files, tensors


def _shards(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{index_path}: not a valid shard index with a 'weight_map' ({exc})") from exc
    files = []
    for name in names:
        # the index is user data: a shard must be a plain file name beside the index
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise InputError(f"{index_path}: shard name {name!r} is not a plain file name in the folder")
        path = index_path.parent / name
        if not path.is_file():
            raise InputError(f"{index_path}: lists shard {name}, which is missing; is the download complete?")
        files.append(path)
    return files


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: truncated or corrupt safetensors file ({exc}); download it again") from exc


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot load it as a torch state dict with weights_only=True "
                         f"({torch_load_reason(exc)}); "
                         "the file is truncated, corrupt or contains code; prefer safetensors") from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputError(f"{path}: expected a state dict (name -> tensor)")
    return data


def map_state_dict(family: Family, model_type: str, raw: Mapping[str, torch.Tensor], arch: Architecture,
                   folder: Path) -> dict[str, torch.Tensor]:
    """Rename (and transpose / fuse) an HF state dict onto the decoder's parameter names, in fp32."""
    rules, skip, prefix = family.rules, family.skip_pattern(), family.prefix
    compiled = [(re.compile(p), t, part, tr) for p, t, part, tr in rules]
    single: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for name, tensor in raw.items():
        short = name[len(prefix):] if name.startswith(prefix) else name
        if skip.fullmatch(short):
            continue
        for pattern, template, part, transpose in compiled:
            match = pattern.fullmatch(short)
            if match:
                value = _to_fp32(tensor, name, folder)
                value = value.t().contiguous() if transpose else value
                target = match.expand(template)
                value = family.convert(arch, target, value)
                if part is None:
                    single[target] = value
                else:
                    parts.setdefault(target, {})[part] = value
                break
        else:
            unknown.append(name)
    if unknown:
        raise InputError(f"{folder}: weights {sorted(unknown)[:5]} (of {len(unknown)} unknown) do not belong to a "
                         f"{model_type} model; the weights and config.json do not match")
    single.update(_fuse(parts, folder))
    if arch.tie_word_embeddings:
        single.pop("lm_head.weight", None)  # transformers ties the head to the embedding, as we do
    return single


def _fuse(parts: dict[str, dict[int, torch.Tensor]], folder: Path) -> dict[str, torch.Tensor]:
    fused = {}
    for target in list(parts):
        pieces = parts.pop(target)  # freed once fused: the pieces and the fused copy never all coexist
        count = next(n for key, n in _PARTS.items() if key in target)
        if sorted(pieces) != list(range(count)):
            raise InputError(f"{folder}: {target} needs {count} projections but the checkpoint has only "
                             f"{len(pieces)}; the weights are incomplete")
        fused[target] = torch.cat([pieces[i] for i in range(count)], dim=0)
    return fused


def _to_fp32(tensor: torch.Tensor, name: str, folder: Path) -> torch.Tensor:
    if tensor.dtype not in FLOAT_DTYPES:
        raise UnsupportedModelError(f"{folder}: tensor {name} has dtype {tensor.dtype}; gptedge exports float32, "
                                    "float16 and bfloat16 checkpoints (quantized checkpoints: export the "
                                    "original, then `gptedge quantize`)")
    return tensor.to(torch.float32)

