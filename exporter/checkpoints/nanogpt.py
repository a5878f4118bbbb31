"""nanoGPT ``ckpt.pt`` (as karpathy/nanoGPT's train.py writes it) -> :class:`LoadedCheckpoint`.

The file is ``{"model": state_dict, "model_args": {n_layer, n_head, n_embd, block_size, bias,
vocab_size, dropout}, "config": {..., "dataset"}, "iter_num", "best_val_loss", "optimizer"}``.
nanoGPT's GPT is GPT-2: learned positions, pre-LayerNorm (eps 1e-5, bias iff ``bias``), fused
``c_attn`` q/k/v projection, exact-erf GELU MLP of width 4*n_embd, LM head tied to ``wte``.
Its linear layers are ``nn.Linear`` ([out, in]), so weights map over without a transpose.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from gptedge.exporter.checkpoints import LoadedCheckpoint, TokenizerFiles, sha256_of, torch_load_reason
from gptedge.exporter.checkpoints.tokenizers import char_tokenizer_from_meta, tokenizer_from_user_path
from gptedge.exporter.config import ExportConfig
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError

log = logging.getLogger(__name__)

COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps the model and prefixes every name
# nanoGPT without flash attention registers its causal mask as a buffer named attn.bias
MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
GPT2_VOCABS = (50257, 50304)  # GPT-2 BPE, and nanoGPT's padding of it to a multiple of 64

# nanoGPT name (with {i} for the layer) -> decoder name; "bias" entries only exist when bias=True
LAYER_NAMES = {
    "ln_1": "attn_norm", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out",
    "ln_2": "mlp_norm", "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down",
}


def load_nanogpt(path: Path, config: ExportConfig) -> LoadedCheckpoint:
    """Read a nanoGPT ``ckpt.pt`` with ``torch.load(weights_only=True)`` and map it onto the decoder.

    The tokenizer comes from ``config.tokenizer``, else a char-level ``meta.pkl`` beside the
    checkpoint or at ``data/<dataset>/meta.pkl`` (relative to the checkpoint's folders or the
    working directory, as nanoGPT's sample.py looks for it).
    """
    path = Path(path)
    checkpoint = _torch_load(path)
    model_args = _model_args(checkpoint, path)
    state = _strip_prefix(checkpoint["model"], path)
    arch = _architecture(model_args, state, path)
    state_dict = _map_names(state, arch, path)
    train_config = checkpoint.get("config")
    if not isinstance(train_config, dict):
        train_config = {}
    dataset = train_config.get("dataset")
    tokenizer, tokenizer_source = _find_tokenizer(path, dataset, config, arch.vocab_size)
    source: dict[str, Any] = {
        "format": "nanogpt", "path": str(path), "sha256": sha256_of(path),
        "iter_num": _plain_number(checkpoint.get("iter_num")),
        "best_val_loss": _plain_number(checkpoint.get("best_val_loss")),
        "dataset": dataset if isinstance(dataset, str) else None,
        "tokenizer_source": tokenizer_source,
    }
    return LoadedCheckpoint(arch=arch, state_dict=state_dict, source=source, tokenizer=tokenizer)


def _torch_load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a nanoGPT ckpt.pt or the folder holding it")
    with open(path, "rb") as handle:
        is_zip = handle.read(4) == b"PK\x03\x04"
    try:
        # mmap: the optimizer state (2x the weights) is never read into memory
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: not a plain nanoGPT checkpoint: it holds objects other than tensors "
                         "and plain data, which could run code when loaded, so it was refused "
                         f"(torch.load weights_only=True: {torch_load_reason(exc)}). "
                         "Re-save only the state dict and model_args") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise InputError(f"{path}: cannot read as a torch checkpoint ({torch_load_reason(exc)}); the file is corrupt, "
                         "truncated or not a nanoGPT ckpt.pt") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict) \
            or not isinstance(checkpoint.get("model_args"), dict):
        raise InputError(f"{path}: not a nanoGPT checkpoint: expected a dict with 'model' (state dict) "
                         "and 'model_args' as nanoGPT's train.py saves it")
    return checkpoint


def _model_args(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    args = checkpoint["model_args"]
    problems = []
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        value = args.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key}={value!r} must be a positive integer")
    if not problems and args["n_embd"] % args["n_head"]:
        problems.append(f"n_embd={args['n_embd']} is not divisible by n_head={args['n_head']}")
    if problems:
        raise InputError(f"{path}: bad model_args: " + "; ".join(problems))
    return args


def _strip_prefix(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise InputError(f"{path}: model state dict entry {name!r} is not a named tensor")
        if name.startswith(COMPILE_PREFIX):
            name = name[len(COMPILE_PREFIX):]
        if MASK_BUFFER.match(name):
            continue  # the causal-mask buffer, not a weight
        out[name] = tensor
    return out


def _architecture(args: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> Architecture:
    embd, heads = args["n_embd"], args["n_head"]
    bias = args.get("bias")
    if bias is None:  # checkpoints from before nanoGPT had the option always used biases
        bias = "transformer.ln_f.bias" in state
    fc = state.get("transformer.h.0.mlp.c_fc.weight")
    width = int(fc.shape[0]) if fc is not None and fc.dim() == 2 else 4 * embd
    head = state.get("lm_head.weight")
    wte = state.get("transformer.wte.weight")
    tied = head is None or (wte is not None and head.shape == wte.shape and torch.equal(head, wte))
    return Architecture(
        vocab_size=args["vocab_size"], hidden_size=embd, num_layers=args["n_layer"], num_heads=heads,
        num_kv_heads=heads, head_dim=embd // heads, intermediate_size=width, max_context=args["block_size"],
        norm="layernorm", norm_eps=1e-5, norm_bias=bool(bias), position="learned", activation="gelu",
        qkv_bias=bool(bias), attn_out_bias=bool(bias), mlp_bias=bool(bias), tie_word_embeddings=tied)


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """nanoGPT parameter name -> shape for ``arch`` (the names a nanoGPT state dict must hold)."""
    C, V, width = arch.hidden_size, arch.vocab_size, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (V, C), "transformer.wpe.weight": (arch.max_context, C),
        "transformer.ln_f.weight": (C,),
    }
    per_layer = {"ln_1": ((C,), (C,)), "attn.c_attn": ((3 * C, C), (3 * C,)),
                 "attn.c_proj": ((C, C), (C,)), "ln_2": ((C,), (C,)),
                 "mlp.c_fc": ((width, C), (width,)), "mlp.c_proj": ((C, width), (C,))}
    for i in range(arch.num_layers):
        for part, (weight, bias) in per_layer.items():
            shapes[f"transformer.h.{i}.{part}.weight"] = weight
            if arch.qkv_bias:
                shapes[f"transformer.h.{i}.{part}.bias"] = bias
    if arch.norm_bias:
        shapes["transformer.ln_f.bias"] = (C,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def _map_names(state: dict[str, torch.Tensor], arch: Architecture, path: Path) -> dict[str, torch.Tensor]:
    expected = expected_shapes(arch)
    ignorable = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - ignorable)
    wrong = [f"{name} {tuple(state[name].shape)} (expected {shape})"
             for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"missing {missing[:6]}" if missing else "", f"unexpected {unexpected[:6]}" if unexpected else "",
            f"wrong shapes: {', '.join(wrong[:6])}" if wrong else ""]))
        raise InputError(f"{path}: state dict does not match nanoGPT's GPT with model_args "
                         f"(n_layer={arch.num_layers}, n_embd={arch.hidden_size}, vocab_size={arch.vocab_size}, "
                         f"block_size={arch.max_context}, bias={arch.qkv_bias}): {details}")
    out = {"embed.weight": state["transformer.wte.weight"], "pos_embed.weight": state["transformer.wpe.weight"],
           "norm.weight": state["transformer.ln_f.weight"]}
    if arch.norm_bias:
        out["norm.bias"] = state["transformer.ln_f.bias"]
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(arch.num_layers):
        for theirs, ours in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                name = f"transformer.h.{i}.{theirs}.{kind}"
                if name in state:
                    out[f"layers.{i}.{ours}.{kind}"] = state[name]
    return out


def meta_candidates(path: Path, dataset: Any) -> list[Path]:
    """Where a char-level ``meta.pkl`` may be, most specific first: beside ``ckpt.pt``, then
    ``data/<dataset>/meta.pkl`` under each of the checkpoint's folders, then under the cwd."""
    candidates = [path.parent / "meta.pkl"]
    # a dataset name is a single folder name; anything else could point outside data/
    if isinstance(dataset, str) and dataset and dataset not in (".", "..") \
            and "/" not in dataset and "\\" not in dataset and "\0" not in dataset:
        roots = [*path.resolve().parents, Path(os.getcwd())]
        candidates += [root / "data" / dataset / "meta.pkl" for root in roots]
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def _find_tokenizer(path: Path, dataset: Any, config: ExportConfig,
                    vocab_size: int) -> tuple[TokenizerFiles | None, str | None]:
    if config.tokenizer is not None:
        return tokenizer_from_user_path(config.tokenizer, "char"), str(config.tokenizer)
    for candidate in meta_candidates(path, dataset):
        if candidate.is_file():
            log.info("nanoGPT tokenizer: %s", candidate)
            return char_tokenizer_from_meta(candidate), str(candidate)
    if config.allow_missing_tokenizer:
        return None, None
    hint = ""
    if vocab_size in GPT2_VOCABS:
        hint = (f" This model's vocab_size {vocab_size} is GPT-2's BPE: pass --tokenizer with GPT-2's "
                "tokenizer.json, or a folder with vocab.json + merges.txt.")
    raise InputError(f"{path}: no tokenizer found (no meta.pkl beside it"
                     f"{f' or at data/{dataset}/meta.pkl' if isinstance(dataset, str) else ''}).{hint} "
                     "Pass --tokenizer PATH, or --no-tokenizer to export a bundle that works on token ids only")


def _plain_number(value: Any) -> float | int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
