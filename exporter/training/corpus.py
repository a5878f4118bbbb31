"""Training text for the tiny demo model: a user's text file, or a corpus every machine has.

With no text given we use the Python standard library's own source: a deterministic selection of
its top-level ``.py`` files (sorted by name, pure ASCII only, so the char vocabulary stays ~95
symbols), concatenated up to ~1 MB. Every CPython installation ships these files, so the demo needs
no download. The text differs slightly between Python versions; the checkpoint records its sha256.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from gptedge.runtime.errors import InputError

STDLIB_DATASET = "python-stdlib"
DEFAULT_CORPUS_BYTES = 1_000_000
VAL_FRACTION = 0.1  # nanoGPT's data/shakespeare_char/prepare.py: first 90 % train, last 10 % val
MIN_TEXT_CHARS = 2_000


@dataclass(frozen=True)
class Corpus:
    """A training text, where it came from (``dataset``) and its sha256 (hex of the UTF-8 bytes)."""

    text: str
    dataset: str
    sha256: str

    def split(self) -> tuple[str, str]:
        """(train, val): the first 90 % and the last 10 % of the characters."""
        cut = int(len(self.text) * (1 - VAL_FRACTION))
        return self.text[:cut], self.text[cut:]


def stdlib_text(max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """The concatenated, ASCII-only top-level ``.py`` files of this Python's standard library."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(folder.glob("*.py")):
        try:
            data = path.read_bytes()
        except OSError:
            continue  # an unreadable file is skipped; the selection stays deterministic per install
        if not data.isascii() or b"\t" in data or b"\r" in data:
            continue
        text = data.decode("ascii")
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if total < MIN_TEXT_CHARS:
        raise InputError(f"{folder}: found no Python standard library sources to train on "
                         "(a stripped-down Python?); pass a text file with --text")
    return "".join(parts)[:max_bytes]


def load_corpus(text_path: str | os.PathLike[str] | None = None) -> Corpus:
    """The text at ``text_path`` (UTF-8), or the standard-library corpus when it is None."""
    if text_path is None:
        text, dataset = stdlib_text(), STDLIB_DATASET
    else:
        path = Path(text_path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise InputError(f"--text {path}: no such file; give a UTF-8 text file") from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"--text {path}: not UTF-8 text ({exc.reason}); convert it to UTF-8") from exc
        if len(text) < MIN_TEXT_CHARS:
            raise InputError(f"--text {path}: only {len(text)} characters; give at least "
                             f"{MIN_TEXT_CHARS} so there is something to learn and to validate on")
        dataset = path.name
    return Corpus(text=text, dataset=dataset, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
