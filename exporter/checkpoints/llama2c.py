"""llama2.c float32 ``.bin`` checkpoints (karpathy/llama2.c export.py) -> :class:`LoadedCheckpoint`.

Two layouts, both float32 little-endian:

- legacy (v0, ``legacy_export``): 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, seq_len`` (a negative vocab_size means an unshared classifier), then token
  embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real,
  freq_cis_imag [seq_len, head_size/2] each, then wcls when unshared (run.c's order).
- version 1 (``version1_export``): uint32 magic ``0x616b3432`` ("ak42"), int32 version 1, the same
  7 int32 (vocab_size positive), uint8 shared_classifier, zero padding to 256 bytes, then rms_att,
  rms_ffn, rms_final, token embedding, wq, wk, wv, wo, w1, w2, w3, then wcls when unshared.

Weights are ``[out, in]`` like nn.Linear. llama2.c rotates adjacent pairs (interleaved RoPE);
the decoder uses HF's half-split layout, so wq/wk rows are permuted per head as HF's
convert_llama_weights_to_hf does, which leaves every attention score unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptedge.exporter.checkpoints import LoadedCheckpoint, TokenizerFiles, sha256_of
from gptedge.exporter.checkpoints.tokenizers import llama2c_tokenizer, tokenizer_from_user_path
from gptedge.exporter.config import ExportConfig
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError, UnsupportedModelError

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
V1_HEADER_BYTES = 256
LEGACY_HEADER_BYTES = 7 * 4
FLOAT_BYTES = 4


@dataclass(frozen=True)
class Llama2cHeader:
    """The 7 header numbers plus where the weights start. Sizes are counts, not bytes."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int  # 0 = legacy
    offset: int  # bytes before the first weight

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size


def read_header(path: Path) -> Llama2cHeader:
    """Parse and validate the header of a llama2.c ``.bin`` (legacy or v1); checks the file size."""
    size = path.stat().st_size
    params: tuple[int, int, int, int, int, int, int]  # dim, hidden_dim, layers, heads, kv heads, vocab, seq_len
    with open(path, "rb") as handle:
        head = handle.read(V1_HEADER_BYTES)
    if len(head) >= 8 and struct.unpack_from("<I", head, 0)[0] == MAGIC:
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            raise UnsupportedModelError(f"{path}: llama2.c .bin version {version} is not supported (only the "
                                        "float32 legacy and version 1 files); export it with --version 1")
        if len(head) < V1_HEADER_BYTES:
            raise InputError(f"{path}: {size} bytes is shorter than the 256-byte version-1 header; truncated")
        params = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        offset = V1_HEADER_BYTES
    else:
        if len(head) < LEGACY_HEADER_BYTES:
            raise InputError(f"{path}: {size} bytes is too short for a llama2.c header")
        params = struct.unpack_from("<7i", head, 0)
        version, offset = 0, LEGACY_HEADER_BYTES
        shared = params[5] > 0
        params = (*params[:5], abs(params[5]), params[6])
    header = Llama2cHeader(*params, shared_classifier=shared, version=version, offset=offset)
    _check_header(header, path)
    expected = offset + FLOAT_BYTES * sum(count for _, count in _layout(header))
    if size != expected:
        raise InputError(f"{path}: file has {size} bytes but its header ({_describe(header)}) needs exactly "
                         f"{expected}; the file is truncated, padded or not a float32 llama2.c checkpoint")
    return header


def _describe(h: Llama2cHeader) -> str:
    return (f"dim={h.dim}, hidden_dim={h.hidden_dim}, n_layers={h.n_layers}, n_heads={h.n_heads}, "
            f"n_kv_heads={h.n_kv_heads}, vocab_size={h.vocab_size}, seq_len={h.seq_len}, "
            f"{'shared' if h.shared_classifier else 'unshared'} classifier, version {h.version}")


def _check_header(h: Llama2cHeader, path: Path) -> None:
    problems = [f"{name}={getattr(h, name)} must be positive"
                for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
                if getattr(h, name) <= 0]
    if not problems:
        if h.dim % h.n_heads:
            problems.append(f"n_heads={h.n_heads} does not divide dim={h.dim}")
        elif h.head_size % 2:
            problems.append(f"head size {h.head_size} (dim/n_heads) must be even for RoPE")
        if h.n_heads % h.n_kv_heads:
            problems.append(f"n_kv_heads={h.n_kv_heads} does not divide n_heads={h.n_heads}")
    if problems:
        raise InputError(f"{path}: impossible llama2.c header ({_describe(h)}): " + "; ".join(problems)
                         + ". This is not a float32 llama2.c checkpoint or it is corrupt")


def _layout(h: Llama2cHeader) -> list[tuple[str, int]]:
    """(tensor, float count) in file order; names are llama2.c's."""
    L, dim, hidden, V = h.n_layers, h.dim, h.hidden_dim, h.vocab_size
    norms = [("rms_att", L * dim), ("rms_ffn", L * dim), ("rms_final", dim)]
    matrices = [("wq", L * dim * dim), ("wk", L * h.kv_dim * dim), ("wv", L * h.kv_dim * dim),
                ("wo", L * dim * dim), ("w1", L * hidden * dim), ("w2", L * dim * hidden),
                ("w3", L * hidden * dim)]
    classifier = [] if h.shared_classifier else [("wcls", V * dim)]
    if h.version == 1:
        return [*norms, ("token_embedding", V * dim), *matrices, *classifier]
    freqs = [("freq_cis_real", h.seq_len * h.head_size // 2), ("freq_cis_imag", h.seq_len * h.head_size // 2)]
    return [("token_embedding", V * dim), norms[0], *matrices[:4], norms[1], *matrices[4:], norms[2],
            *freqs, *classifier]


def read_weights(path: Path, header: Llama2cHeader) -> dict[str, np.ndarray]:
    """llama2.c's tensors by name, shaped ([L, out, in] for per-layer matrices), float32 copies."""
    h = header
    L, dim, hidden, V = h.n_layers, h.dim, h.hidden_dim, h.vocab_size
    shapes = {"token_embedding": (V, dim), "rms_att": (L, dim), "rms_ffn": (L, dim), "rms_final": (dim,),
              "wq": (L, dim, dim), "wk": (L, h.kv_dim, dim), "wv": (L, h.kv_dim, dim), "wo": (L, dim, dim),
              "w1": (L, hidden, dim), "w2": (L, dim, hidden), "w3": (L, hidden, dim),
              "freq_cis_real": (h.seq_len, h.head_size // 2), "freq_cis_imag": (h.seq_len, h.head_size // 2),
              "wcls": (V, dim)}
    data = np.memmap(path, dtype="<f4", mode="r", offset=h.offset)  # size already checked by read_header
    out, start = {}, 0
    for name, count in _layout(h):
        out[name] = np.array(data[start:start + count], dtype=np.float32).reshape(shapes[name])
        start += count
    del data
    return out


def interleaved_to_half_split(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection [n_heads * head_size, in] within each head from
    llama2.c's adjacent-pair RoPE layout (0,1),(2,3),... to HF's halves (0,D/2),(1,D/2+1),...;
    row h*D + p*D/2 + j of the result is row h*D + 2j + p of the input."""
    rows, cols = weight.shape
    head = rows // n_heads
    return weight.reshape(n_heads, head // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def load_llama2c(path: Path, config: ExportConfig) -> LoadedCheckpoint:
    """Read a llama2.c float32 ``.bin`` and its ``tokenizer.bin`` (from ``config.tokenizer`` or
    beside the checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a llama2.c .bin checkpoint")
    header = read_header(path)
    weights = read_weights(path, header)
    arch = Architecture(
        vocab_size=header.vocab_size, hidden_size=header.dim, num_layers=header.n_layers,
        num_heads=header.n_heads, num_kv_heads=header.n_kv_heads, head_dim=header.head_size,
        intermediate_size=header.hidden_dim, max_context=header.seq_len, norm="rmsnorm", norm_eps=1e-5,
        norm_bias=False, position="rope", rope_theta=10000.0, activation="swiglu", qkv_bias=False,
        attn_out_bias=False, mlp_bias=False, tie_word_embeddings=header.shared_classifier)
    tokenizer, tokenizer_source = _find_tokenizer(path, config)
    source: dict[str, Any] = {"format": "llama2c", "path": str(path), "sha256": sha256_of(path),
                              "version": header.version, "shared_classifier": header.shared_classifier,
                              "tokenizer_source": tokenizer_source}
    return LoadedCheckpoint(arch=arch, state_dict=to_state_dict(weights, header), source=source,
                            tokenizer=tokenizer)


def to_state_dict(w: dict[str, np.ndarray], header: Llama2cHeader) -> dict[str, torch.Tensor]:
    """Map llama2.c tensors onto the decoder's names (q/k permuted for half-split RoPE)."""
    t = torch.from_numpy
    state = {"embed.weight": t(w["token_embedding"]), "norm.weight": t(w["rms_final"])}
    if not header.shared_classifier:
        state["lm_head.weight"] = t(w["wcls"])
    for i in range(header.n_layers):
        q = interleaved_to_half_split(w["wq"][i], header.n_heads)
        k = interleaved_to_half_split(w["wk"][i], header.n_kv_heads)
        state[f"layers.{i}.attn_norm.weight"] = t(w["rms_att"][i].copy())
        state[f"layers.{i}.attn.qkv.weight"] = t(np.concatenate([q, k, w["wv"][i]]))
        state[f"layers.{i}.attn.out.weight"] = t(w["wo"][i].copy())
        state[f"layers.{i}.mlp_norm.weight"] = t(w["rms_ffn"][i].copy())
        state[f"layers.{i}.mlp.gate_up.weight"] = t(np.concatenate([w["w1"][i], w["w3"][i]]))
        state[f"layers.{i}.mlp.down.weight"] = t(w["w2"][i].copy())
    return state


def _find_tokenizer(path: Path, config: ExportConfig) -> tuple[TokenizerFiles | None, str | None]:
    if config.tokenizer is not None:
        return tokenizer_from_user_path(config.tokenizer, "llama2c"), str(config.tokenizer)
    beside = path.parent / "tokenizer.bin"
    if beside.is_file() and beside.resolve() != path.resolve():
        return llama2c_tokenizer(beside), str(beside)
    if config.allow_missing_tokenizer:
        return None, None
    raise InputError(f"{path}: no tokenizer.bin beside it; pass --tokenizer PATH (llama2.c's tokenizer.bin, "
                     "e.g. tok512.bin for stories260K), or --no-tokenizer to export a bundle that works on token ids only")
