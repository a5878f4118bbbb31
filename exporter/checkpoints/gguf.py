"""GGUF files (llama.cpp) -> :class:`LoadedCheckpoint`, read with the ``gguf`` package.

Metadata keys ``{arch}.*`` become an HF config and tensor names HF names (:mod:`gguf_arch`), so each
GGUF architecture exports through its HF family mapping; every tensor is dequantized to float32 by
``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, K-quants).
The tokenizer (``tokenizer.ggml.model == "gpt2"``, byte-level BPE) is rebuilt as a ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptedge.exporter.checkpoints import LoadedCheckpoint, TokenizerFiles, sha256_of
from gptedge.exporter.checkpoints.gguf_arch import (
    MODEL_TYPES,
    hf_config,
    hf_tensor_names,
    undo_llamacpp_layout,
)
from gptedge.exporter.checkpoints.hf_config import architecture_from_config
from gptedge.exporter.checkpoints.hf_reference import transformers_reference
from gptedge.exporter.config import ExportConfig
from gptedge.runtime.bundle import Architecture, TokenizerInfo
from gptedge.runtime.errors import InputError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
TOKENIZER_FILE = "tokenizer.json"
# llama.cpp token types: 3 = control (<|im_start|>, <s>), 4 = user-defined; both are atomic tokens.
SPECIAL_TOKEN_TYPES = (3, 4)


def _fields(reader: Any) -> dict[str, Any]:
    """Every metadata key -> its Python value (str, int, float, bool or list)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: cannot read it as GGUF ({exc}); the file is truncated or corrupt") from exc


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


class _Renamed(Mapping[str, torch.Tensor]):
    """HF name -> the GGUF tensor with llama.cpp's layout undone, converted when looked up (so the
    family mapping fuses one layer at a time instead of holding every tensor twice)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], names: dict[str, str], gguf_arch: str,
                 heads: tuple[int, int]):
        self._tensors, self._arch, self._heads = tensors, gguf_arch, heads
        self._gguf_name = {hf_name: gguf_name for gguf_name, hf_name in names.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        gguf_name = self._gguf_name[name]
        return torch.from_numpy(undo_llamacpp_layout(self._arch, gguf_name, self._tensors[gguf_name], self._heads))

    def __iter__(self) -> Iterator[str]:
        return iter(self._gguf_name)

    def __len__(self) -> int:
        return len(self._gguf_name)


def to_state_dict(tensors: Mapping[str, np.ndarray], cfg: dict[str, Any], arch: Architecture,
                  where: Path) -> dict[str, torch.Tensor]:
    """GGUF tensors -> the decoder's state dict: HF names from gguf's table, llama.cpp's layout
    changes undone, then the HF family's rules (fusing q/k/v and gate/up, transposing Conv1D)."""
    from gptedge.exporter.checkpoints.hf import map_state_dict
    from gptedge.exporter.checkpoints.hf_config import family_of

    gguf_arch = next(k for k, v in MODEL_TYPES.items() if v == cfg["model_type"])
    family = family_of(cfg, where)
    names = hf_tensor_names(gguf_arch, arch.num_layers, list(tensors), family, where)
    heads = (arch.num_heads, arch.num_kv_heads)
    raw = _Renamed(tensors, names, gguf_arch, heads)
    return map_state_dict(family, cfg["model_type"], raw, arch, where)


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
    # the metadata first: an unknown architecture is refused before any tensor is dequantized
    cfg = hf_config(meta, {t.name for t in reader.tensors}, path)
    arch = architecture_from_config(cfg, path, config.max_context)
    tensors = read_tensors(reader, path)
    gguf_arch = meta["general.architecture"]
    state = to_state_dict(tensors, cfg, arch, path)
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
