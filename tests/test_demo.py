"""`gptedge demo` end to end with the tiny size: train, export, quantize, evaluate, generate."""

from __future__ import annotations

import json

import pytest

from gptedge.exporter.demo import PRECISIONS, DemoConfig, run_demo
from gptedge.runtime.cli import main
from gptedge.runtime.errors import InputError, OutputExistsError


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny demo through the real CLI entry point (its output captured by the caller)."""
    workdir = tmp_path_factory.mktemp("demo") / "work"
    return workdir, main(["demo", "--size", "tiny", "--steps", "40", "--workdir", str(workdir)])


def test_demo_ends_with_a_table_of_every_precision(demo_run, capsys):
    workdir, code = demo_run
    assert code == 0
    results = json.loads((workdir / "results.json").read_text())
    assert [row["precision"] for row in results["rows"]] == list(PRECISIONS)
    for row in results["rows"]:
        assert row["note"] == "" and row["bundle"], row  # every precision was built and kept
        assert row["size_mb"] > 0 and row["ttft_ms"] > 0 and row["decode_tok_s"] > 0
        assert row["sample"]  # a streamed sample came back
        assert abs(row["delta_pct"]) < 10
    fp32 = results["rows"][0]
    assert results["parity_max_abs"] < 1e-4
    # the model really learned: far below the untrained (uniform-ish) perplexity
    assert fp32["ppl"] < 0.5 * results["untrained_ppl"]
    sizes = {row["precision"]: row["size_mb"] for row in results["rows"]}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"] and sizes["fp16"] < sizes["fp32"]
    for precision in PRECISIONS:
        assert (workdir / "bundles" / precision / "manifest.json").is_file()


def test_demo_table_printed(tmp_path, capsys):
    """The printed table names every precision (rendered from a finished run's results)."""
    from rich.console import Console

    from gptedge.exporter.demo import DemoResult, DemoRow
    from gptedge.runtime.cli.demo_cmd import results_table

    rows = [DemoRow(p, tmp_path, 1.0, 10.0, 0.0, 1.0, 100.0, "x") for p in PRECISIONS]
    result = DemoResult(tmp_path, rows, 96, 90.0, 10.0, False, 1.0, 100, "p", 1e-6, 1.0)
    console = Console(record=True, width=120)
    console.print(results_table(result))
    text = console.export_text()
    assert all(p in text for p in PRECISIONS) and "perplexity" in text and "decode tok/s" in text


def test_demo_refuses_other_settings_and_foreign_folders(demo_run, tmp_path):
    workdir, _ = demo_run
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_demo(DemoConfig(workdir=workdir, size="tiny", steps=41))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", "--size", "tiny", "--workdir", str(foreign)]) == OutputExistsError.exit_code
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError):
        DemoConfig(size="huge")
