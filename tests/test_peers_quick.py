"""benchmarks/peers.py --quick: every main-env peer and gptedge build, run and land in the table.

Tiny configs, no onnxruntime-genai (that peer needs a second venv); no timing is asserted. The
Llama config only: the GPT-2 rows take the same code path through the script, and GPT-2 bundles in
Optimum are tests/test_hf_clients.py's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("transformers")

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


def _load_peers():
    spec = importlib.util.spec_from_file_location("gptedge_bench_peers", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_covers_every_engine(tmp_path: Path) -> None:
    peers = _load_peers()
    rows = peers.main(["--quick", "--only", "llama", "--workdir", str(tmp_path), "--json"])
    seen = {(r["model"], r["engine"], r["precision"]) for r in rows}
    assert ("llama", "transformers", "fp32") in seen
    assert {("llama", "optimum-ort", p) for p in ("fp32", "int8")} <= seen
    assert {("llama", "gptedge", p) for p in ("fp32", "int8", "int4")} <= seen
    for row in rows:
        assert row["decode_tok_s"] > 0 and row["ttft_ms"] > 0
        if row["engine"] != "gptedge":
            assert row["gptedge_decode_x"] > 0
