"""Named export stages with elapsed time: logged always, shown live when a listener is installed.

The exporter wraps each step (load, trace, save, parity, ORT variant) in :func:`stage`; the CLI
installs a listener that draws them as a rich progress list, a library caller may install its own
(or read the ``gptedge.exporter.stages`` log records).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

log = logging.getLogger(__name__)


class StageListener(Protocol):
    """Receives stage events; ``seconds`` is the wall-clock time the stage took."""

    def started(self, name: str) -> None: ...

    def finished(self, name: str, seconds: float) -> None: ...


_LISTENER: ContextVar[StageListener | None] = ContextVar("gptedge_export_stage_listener", default=None)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the enclosed block as the export stage ``name`` and tell the installed listener."""
    listener = _LISTENER.get()
    if listener is not None:
        listener.started(name)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    log.info("export stage %s: %.1f s", name, seconds)
    if listener is not None:
        listener.finished(name, seconds)


@contextmanager
def stage_listener(listener: StageListener) -> Iterator[None]:
    """Install ``listener`` for the stages run inside the block (per thread/task)."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)
