"""HuggingFace folders (``config.json`` + safetensors / ``pytorch_model.bin``) → :class:`LoadedCheckpoint`.

Supported: ``gpt2`` and the Llama family (``llama``, ``mistral``, ``qwen2``); the config mapping and
its refusals live in :mod:`hf_config`, the transformers parity reference in :mod:`hf_reference`.
Weights are renamed onto the decoder's parameters (see ``gptedge.exporter.model``): GPT-2's Conv1D
weights are stored ``[in, out]`` and are transposed; Llama's q/k/v and gate/up projections are
concatenated into the fused ``attn.qkv`` and ``mlp.gate_up``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from gptedge.exporter.chat_template import read_hf_chat_template
from gptedge.exporter.checkpoints import LoadedCheckpoint, torch_load_reason
from gptedge.exporter.checkpoints.hf_config import (
    LLAMA_FAMILY,
    architecture_from_config,
    export_context,
    read_config,
)
from gptedge.exporter.checkpoints.hf_reference import transformers_reference
from gptedge.exporter.checkpoints.hf_tokenizer import load_tokenizer
from gptedge.exporter.config import ExportConfig
from gptedge.exporter.genai_config import GENAI_CONFIG_NAME, genai_config_bytes
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError, UnsupportedModelError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COPIED_FILES = ("config.json", "generation_config.json")

# (pattern on the checkpoint name, decoder name template, part index for fused tensors or None,
#  transpose): GPT-2's Conv1D stores [in, out], the decoder's Linear [out, in].
Rule = tuple[str, str, int | None, bool]
_GPT2_RULES: list[Rule] = [
    (r"wte\.weight", "embed.weight", None, False),
    (r"wpe\.weight", "pos_embed.weight", None, False),
    (r"h\.(\d+)\.ln_1\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"h\.(\d+)\.attn\.c_attn\.weight", r"layers.\1.attn.qkv.weight", None, True),
    (r"h\.(\d+)\.attn\.c_attn\.bias", r"layers.\1.attn.qkv.bias", None, False),
    (r"h\.(\d+)\.attn\.c_proj\.weight", r"layers.\1.attn.out.weight", None, True),
    (r"h\.(\d+)\.attn\.c_proj\.bias", r"layers.\1.attn.out.bias", None, False),
    (r"h\.(\d+)\.ln_2\.(weight|bias)", r"layers.\1.mlp_norm.\2", None, False),
    (r"h\.(\d+)\.mlp\.c_fc\.weight", r"layers.\1.mlp.up.weight", None, True),
    (r"h\.(\d+)\.mlp\.c_fc\.bias", r"layers.\1.mlp.up.bias", None, False),
    (r"h\.(\d+)\.mlp\.c_proj\.weight", r"layers.\1.mlp.down.weight", None, True),
    (r"h\.(\d+)\.mlp\.c_proj\.bias", r"layers.\1.mlp.down.bias", None, False),
    (r"ln_f\.(weight|bias)", r"norm.\1", None, False),
    (r"lm_head\.weight", "lm_head.weight", None, False),
]
# Causal-mask buffers older GPT-2 checkpoints carry; the decoder builds its mask from attention_mask.
_GPT2_SKIP = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

_LLAMA_RULES: list[Rule] = [
    (r"embed_tokens\.weight", "embed.weight", None, False),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight", None, False),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 0, False),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 1, False),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 2, False),
    (r"layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"layers.\1.attn.out.\2", None, False),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight", None, False),
    (r"layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"layers.\1.mlp.gate_up.\2", 0, False),
    (r"layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"layers.\1.mlp.gate_up.\2", 1, False),
    (r"layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"layers.\1.mlp.down.\2", None, False),
    (r"norm\.weight", "norm.weight", None, False),
    (r"lm_head\.weight", "lm_head.weight", None, False),
]
# Old Llama checkpoints saved the RoPE inverse frequencies; the decoder derives them from the config.
_LLAMA_SKIP = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
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
    state_dict = map_state_dict(cfg["model_type"], raw, arch, folder)
    del raw
    tokenizer = load_tokenizer(folder, cfg, config)
    extra_files = {name: (folder / name).read_bytes() for name in COPIED_FILES if (folder / name).is_file()}
    if cfg["model_type"] in LLAMA_FAMILY:
        extra_files[GENAI_CONFIG_NAME] = genai_config_bytes(
            arch, cfg["model_type"], export_context(cfg, config.max_context),
            tokenizer.info if tokenizer else None)
    reference = transformers_reference(folder)
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


def map_state_dict(model_type: str, raw: dict[str, torch.Tensor], arch: Architecture,
                   folder: Path) -> dict[str, torch.Tensor]:
    """Rename (and transpose / fuse) an HF state dict onto the decoder's parameter names, in fp32."""
    if model_type == "gpt2":
        rules, skip, prefix = _GPT2_RULES, _GPT2_SKIP, "transformer."
    else:
        rules, skip, prefix = _LLAMA_RULES, _LLAMA_SKIP, "model."
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
    for target, pieces in parts.items():
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

