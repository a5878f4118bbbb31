"""Text files -> token ids with the bundle's own tokenizer (calibration and evaluation data)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gptedge.runtime.bundle import Bundle
from gptedge.runtime.errors import GenerationError, InputError
from gptedge.runtime.tokenizer import load_tokenizer, with_bos


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The text of ``path``; InputError (naming ``what``, e.g. ``--calib``) when missing/empty/binary."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {p}: is a folder; pass a UTF-8 text file")
    if not p.is_file():
        raise InputError(f"{what} {p}: no such file; pass a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {p}: not UTF-8 text ({exc.reason}); pass a plain text file") from exc
    if not text.strip():
        raise InputError(f"{what} {p}: the file is empty; pass a text file with real sample text")
    return text


def encode(bundle: Bundle, text: str, what: str) -> np.ndarray:
    """Token ids (int64, 1-D) of ``text``; BOS is prepended when the tokenizer adds one to prompts."""
    tokenizer = load_tokenizer(bundle)
    try:
        ids = tokenizer.encode(text)
    except GenerationError as exc:
        raise InputError(f"{what}: {exc}") from exc
    return np.asarray(with_bos(bundle.manifest.tokenizer, ids), dtype=np.int64)


def split_held_out(text: str, fraction: float = 0.1) -> tuple[str, str]:
    """(first part, last ``fraction``) of ``text``, cut at a character boundary."""
    cut = int(len(text) * (1.0 - fraction))
    return text[:cut], text[cut:]


def require_tokens(ids: np.ndarray, needed: int, what: str) -> None:
    if len(ids) < needed:
        raise InputError(f"{what}: only {len(ids)} tokens, need at least {needed} (one window of the "
                         "model's context); pass a longer text file")
