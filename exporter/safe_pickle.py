"""A restricted unpickler for small metadata pickles (nanoGPT's ``meta.pkl``).

A pickle can name any importable callable and call it while it is being read; that is how a
malicious file runs code. :class:`RestrictedUnpickler` refuses every global lookup
(``find_class``) and every persistent id, so only the opcodes that build plain containers and
scalars work: dict, list, tuple, set, str, bytes, int, float, bool and None. Anything else stops
with an :class:`~gptedge.runtime.errors.InputError` before a single foreign callable is reached.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from gptedge.runtime.errors import InputError

# A char-level meta.pkl is a few KiB; refusing huge files keeps a hostile one from exhausting memory.
MAX_PICKLE_BYTES = 64 << 20
ALLOWED_TYPES = (dict, list, tuple, set, frozenset, str, bytes, int, float, bool, type(None))


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves no globals: classes, functions and reducers all fail."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id")


def safe_loads(data: bytes, where: str = "pickle") -> Any:
    """Unpickle ``data`` allowing plain builtin data only; :class:`InputError` names ``where``."""
    try:
        value = RestrictedUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, OverflowError, RecursionError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: not a plain-data pickle ({exc}); it may try to run code, "
                         "so it was not loaded. Re-create it from plain dicts, lists and strings") from exc
    _check_plain(value, where)
    return value


def safe_load(path: Path) -> Any:
    """Read and restricted-unpickle the file at ``path`` (see :func:`safe_loads`)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise InputError(f"{path}: {size} bytes is too large for a metadata pickle "
                         f"(limit {MAX_PICKLE_BYTES}); is this the right file?")
    return safe_loads(path.read_bytes(), str(path))


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    # Opcodes alone can build only these types, but checking keeps the contract explicit.
    if depth > 100:
        raise InputError(f"{where}: pickle nests deeper than 100 levels")
    if type(value) not in ALLOWED_TYPES:
        raise InputError(f"{where}: pickle holds a {type(value).__name__}, only plain data is allowed")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, where, depth + 1)
            _check_plain(item, where, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _check_plain(item, where, depth + 1)
