"""GGUF files (llama.cpp) -> :class:`LoadedCheckpoint`, read with the ``gguf`` package.

Metadata keys ``{arch}.*`` become the :class:`Architecture`; every tensor is dequantized to
float32 by ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, K-quants). llama.cpp's
convert script stores the q/k rows of ``llama`` models in the interleaved (adjacent-pair) RoPE
layout; they are put back into the half-split layout the decoder uses (qwen2 is stored unpermuted).
The tokenizer (``tokenizer.ggml.model == "gpt2"``, byte-level BPE) is rebuilt as a ``tokenizer.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptedge.exporter.checkpoints import LoadedCheckpoint, TokenizerFiles, sha256_of
from gptedge.exporter.checkpoints.hf_reference import transformers_reference
from gptedge.exporter.checkpoints.llama2c import interleaved_to_half_split
from gptedge.exporter.config import ExportConfig
from gptedge.runtime.bundle import Architecture, TokenizerInfo
from gptedge.runtime.errors import InputError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("llama", "qwen2")
TOKENIZER_FILE = "tokenizer.json"
# llama.cpp token types: 3 = control (<|im_start|>, <s>), 4 = user-defined; both are atomic tokens.
SPECIAL_TOKEN_TYPES = (3, 4)
LAYER_TENSORS = {"attn_norm": "attn_norm.weight", "attn_output": "attn.out.weight", "ffn_norm": "mlp_norm.weight",
                 "ffn_down": "mlp.down.weight"}


def _fields(reader: Any) -> dict[str, Any]:
    """Every metadata key -> its Python value (str, int, float, bool or list)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: cannot read it as GGUF ({exc}); the file is truncated or corrupt") from exc


def architecture_from_gguf(meta: dict[str, Any], where: Path) -> Architecture:
    """Map GGUF metadata onto the decoder's :class:`Architecture` (llama and qwen2)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{where}: GGUF architecture {arch!r} is not supported; gptedge exports GGUF "
                                    f"architectures {', '.join(SUPPORTED_ARCHS)}")
    keys = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count", "context_length")
    missing = [k for k in keys if not isinstance(meta.get(f"{arch}.{k}"), int)]
    if missing:
        raise InputError(f"{where}: GGUF metadata lacks {[f'{arch}.{k}' for k in missing]}; the file is incomplete")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedModelError(f"{where}: {arch}.rope.scaling.type={scaling!r} is not supported; "
                                    "the decoder reads GGUF files without RoPE scaling")
    hidden, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
    if meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(f"{where}: {arch}.rope.dimension_count={meta[f'{arch}.rope.dimension_count']} "
                                    f"is not supported: the decoder rotates the whole head ({head_dim})")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    return Architecture(
        vocab_size=int(vocab), hidden_size=hidden, num_layers=meta[f"{arch}.block_count"], num_heads=heads,
        num_kv_heads=meta.get(f"{arch}.attention.head_count_kv") or heads, head_dim=int(head_dim),
        intermediate_size=meta[f"{arch}.feed_forward_length"], max_context=meta[f"{arch}.context_length"],
        norm="rmsnorm", norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        norm_bias=False, position="rope", rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        activation="swiglu", qkv_bias=arch == "qwen2", attn_out_bias=False, mlp_bias=False,
        tie_word_embeddings=False)


class GGUFTensors(Mapping[str, np.ndarray]):
    """GGUF tensor name -> float32 array in torch layout ([out, in] for matrices), dequantized
    when looked up: the loader converts one layer at a time instead of holding every tensor
    twice (dequantized and concatenated) while it builds the state dict."""

    def __init__(self, reader: Any, where: Path):
        self.where = where
        self._tensors = {tensor.name: tensor for tensor in reader.tensors}

    def __getitem__(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(f"{self.where}: tensor {tensor.name} has quantization type "
                                        f"{tensor.tensor_type.name}, which the gguf package cannot dequantize; "
                                        "re-quantize the model to Q8_0, Q4_K or another common type") from exc
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        # a copy (not a view of the read-only file map), in its own allocation
        return np.array(values, dtype=np.float32).reshape(shape)

    def __contains__(self, name: object) -> bool:  # Mapping's default would dequantize to answer
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def read_tensors(reader: Any, where: Path) -> GGUFTensors:
    """The reader's tensors as float32 arrays in torch layout, each dequantized when looked up."""
    return GGUFTensors(reader, where)


def to_state_dict(tensors: Mapping[str, np.ndarray], arch: Architecture, gguf_arch: str,
                  where: Path) -> dict[str, torch.Tensor]:
    """Map GGUF names (token_embd, blk.N.attn_q, ...) onto the decoder's; undo llama.cpp's q/k permutation."""
    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise InputError(f"{where}: tensor {name!r} is missing; the GGUF file is incomplete")
        return tensors[name]

    state = {"embed.weight": torch.from_numpy(take("token_embd.weight")),
             "norm.weight": torch.from_numpy(take("output_norm.weight"))}
    if not arch.tie_word_embeddings:
        state["lm_head.weight"] = torch.from_numpy(take("output.weight"))
    for i in range(arch.num_layers):
        q, k, v = (take(f"blk.{i}.attn_{n}.weight") for n in "qkv")
        if gguf_arch == "llama":
            q, k = interleaved_to_half_split(q, arch.num_heads), interleaved_to_half_split(k, arch.num_kv_heads)
        state[f"layers.{i}.attn.qkv.weight"] = torch.from_numpy(np.concatenate([q, k, v]))
        if arch.qkv_bias:
            biases = [take(f"blk.{i}.attn_{n}.bias") for n in "qkv"]
            state[f"layers.{i}.attn.qkv.bias"] = torch.from_numpy(np.concatenate(biases))
        gate_up = [take(f"blk.{i}.ffn_gate.weight"), take(f"blk.{i}.ffn_up.weight")]
        state[f"layers.{i}.mlp.gate_up.weight"] = torch.from_numpy(np.concatenate(gate_up))
        for gguf_name, name in LAYER_TENSORS.items():
            state[f"layers.{i}.{name}"] = torch.from_numpy(take(f"blk.{i}.{gguf_name}.weight"))
    return state


def tokenizer_from_gguf(meta: dict[str, Any], where: Path) -> TokenizerFiles:
    """Rebuild a byte-level BPE ``tokenizer.json`` from ``tokenizer.ggml.*`` metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(f"{where}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2' "
                                    "byte-level BPE); pass --no-tokenizer to export a bundle that works on token ids")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind_id in enumerate(types) if kind_id in SPECIAL_TOKEN_TYPES])
    ids = {name: meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding")}
    info = TokenizerInfo(kind="hf", file=TOKENIZER_FILE, bos_id=ids["bos"],
                         eos_ids=() if ids["eos"] is None else (int(ids["eos"]),), pad_id=ids["padding"],
                         add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                         vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))
    return TokenizerFiles(info=info, files={TOKENIZER_FILE: tokenizer.to_str().encode("utf-8")})


def load_gguf(path: Path, config: ExportConfig) -> LoadedCheckpoint:
    """Read a GGUF file: architecture, dequantized weights, tokenizer and chat template."""
    path = Path(path)
    reader = _open(path)
    meta = _fields(reader)
    tensors = read_tensors(reader, path)
    # llama.cpp stores no output.weight for a tied head: the bundle then keeps one shared table
    arch = dataclasses.replace(architecture_from_gguf(meta, path),
                               tie_word_embeddings="output.weight" not in tensors)
    gguf_arch = meta["general.architecture"]
    state = to_state_dict(tensors, arch, gguf_arch, path)
    del tensors
    del reader
    if config.tokenizer is not None:
        from gptedge.exporter.checkpoints.tokenizers import tokenizer_from_user_path
        tokenizer: TokenizerFiles | None = tokenizer_from_user_path(config.tokenizer, "char")
    elif config.allow_missing_tokenizer and meta.get("tokenizer.ggml.model") is None:
        tokenizer = None
    else:
        tokenizer = tokenizer_from_gguf(meta, path)
    reference = transformers_reference(path)
    source = {"format": "gguf", "path": str(path), "sha256": sha256_of(path), "architecture": gguf_arch,
              "file_type": meta.get("general.file_type"), "name": meta.get("general.name"),
              "reference": "transformers GGUF loading" if reference else "gptedge decoder (transformers not installed)"}
    return LoadedCheckpoint(arch=arch, state_dict=state, source=source, tokenizer=tokenizer, reference=reference,
                            chat_template=meta.get("tokenizer.chat_template"))
