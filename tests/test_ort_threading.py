"""The ORT backend's spin-wait choice: GPTEDGE_ORT_SPINNING forces it, else the load decides."""

from __future__ import annotations

import os

import pytest

from gptedge.runtime.ort.session_options import _spinning


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False)])
def test_environment_forces_spinning(monkeypatch, value, expected):
    monkeypatch.setenv("GPTEDGE_ORT_SPINNING", value)
    assert _spinning(2) is expected


def test_load_decides_without_override(monkeypatch):
    monkeypatch.delenv("GPTEDGE_ORT_SPINNING", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert _spinning(2) is False  # busy machine: sleeping threads
    assert _spinning(1) is True  # one thread has no pool to spin
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    cpus = len(os.sched_getaffinity(0))
    assert _spinning(cpus) is True
