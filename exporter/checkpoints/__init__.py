"""Checkpoint loaders: each turns one source format into an :class:`Architecture` plus a state dict
with the decoder's parameter names (see ``gptedge.exporter.model``)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptedge.runtime.bundle import Architecture, TokenizerInfo

if TYPE_CHECKING:  # format detection and the HF config preflight import this package without torch
    import torch

# (input_ids, attention_mask, position_ids, past [(k, v)] * layers) -> (logits, presents)
ReferenceFn = Callable[..., "tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]"]


@dataclass
class TokenizerFiles:
    """Tokenizer files to write into the bundle (name -> bytes) and how to use them."""

    info: TokenizerInfo
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into memory, in the decoder's terms.

    ``reference`` builds the source framework's own model for the parity check (for HF folders,
    the transformers model); None means the decoder itself is the reference (nanoGPT, llama2.c,
    whose semantics the decoder reproduces and the tests prove against independent code).
    ``extra_files`` are copied into the bundle unchanged (HF ``config.json`` and friends).
    ``chat_template`` is the Jinja chat template source, when the checkpoint has one.
    """

    arch: Architecture
    state_dict: dict[str, torch.Tensor]
    source: dict[str, Any]
    tokenizer: TokenizerFiles | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)
    reference: Callable[[], ReferenceFn] | None = None
    chat_template: str | None = None  # Jinja chat template carried by the source (GGUF tokenizer.chat_template)


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder's files (sorted names and contents)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def torch_load_reason(exc: BaseException) -> str:
    """The one informative line of a ``torch.load(weights_only=True)`` failure (torch's message is
    a multi-line essay whose useful part follows ``WeightsUnpickler error:``)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    return reason.split(". Please use")[0].rstrip(".")
