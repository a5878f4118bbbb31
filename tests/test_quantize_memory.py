"""Quantizing stays within memory, and a run without evaluation text says what the mode measured.

The memory bound (issue 16 item 6: peak RSS <= 3x the fp32 weight bytes, calibration and the
quality gate included) is checked on a random-weight decoder big enough (~190 MB of fp32
weights) that copies of the weights dominate the library's own memory: each mode runs in a fresh
child process, which reports its RSS once everything is imported and its peak (VmHWM).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gptedge.quantize import Int4Config, quantize
from gptedge.quantize.config import SMOLLM2_MEASURED_PCT, ungated_note
from tests.quantize_helpers import corpus, trained_bundle

# Above what the imports hold: the ORT thread pools and kernels, the tokenizer, the greedy decode's
# session and the gate's buffers, measured ~100 MB on this model; not proportional to the weights.
FIXED_OVERHEAD = 200 << 20

CHILD = textwrap.dedent("""
    import json, sys
    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    import onnxruntime, gptedge.quantize.evaluate, gptedge.runtime.ort.variant
    from gptedge.quantize import Int4Config, Int8Config, quantize
    bundle, mode, out, calib, evaluation = sys.argv[1:6]
    config = {"int4": Int4Config(), "int8": Int8Config(search_windows=1, calib_windows=4)}[mode]
    before = vm("VmRSS:")
    quantize(bundle, config, out, calib_text=calib, eval_text=evaluation, max_ppl_increase=1000.0,
             max_tokens=1024)
    print(json.dumps({"imports": before, "peak": vm("VmHWM:")}))
""")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A random-weight char-level decoder, 6 layers 1024 wide (~190 MB fp32), and two texts."""
    import torch

    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.exporter.checkpoints import LoadedCheckpoint, TokenizerFiles
    from gptedge.exporter.checkpoints.synthetic import random_state_dict
    from gptedge.runtime.bundle import Architecture, TokenizerInfo

    root = tmp_path_factory.mktemp("wide")
    text = corpus()
    itos = sorted(set(text))
    arch = Architecture(vocab_size=len(itos), hidden_size=1024, num_layers=6, num_heads=16, num_kv_heads=4,
                        head_dim=64, intermediate_size=2048, max_context=256, norm="rmsnorm", norm_eps=1e-5,
                        norm_bias=False, position="rope", activation="swiglu", qkv_bias=False,
                        attn_out_bias=False, mlp_bias=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    tokenizer = TokenizerFiles(info=TokenizerInfo(kind="char", file="tokenizer.char.json", vocab_size=len(itos)),
                               files={"tokenizer.char.json": json.dumps({"itos": itos}).encode()})
    checkpoint = LoadedCheckpoint(arch=arch, state_dict=random_state_dict(arch), tokenizer=tokenizer,
                                  source={"format": "random", "path": "memory"})
    export_loaded(checkpoint, ExportConfig(validate=False), root / "bundle")
    calib, held = root / "calib.txt", root / "eval.txt"
    calib.write_text(text[:8_000], encoding="utf-8")
    held.write_text(text[-3_000:], encoding="utf-8")
    return root / "bundle", calib, held


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantize_peak_rss_within_3x_weights(mode, wide, tmp_path):
    bundle, calib, held = wide
    done = subprocess.run([sys.executable, "-c", CHILD, str(bundle), mode, str(tmp_path / mode), str(calib),
                           str(held)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    weights = (bundle / "model.onnx.data").stat().st_size
    above = figures["peak"] - figures["imports"]
    assert above <= 3 * weights + FIXED_OVERHEAD, (
        f"{mode}: peak {figures['peak'] / 1e6:.0f} MB, {above / 1e6:.0f} MB above the imports "
        f"= {above / weights:.2f}x the {weights / 1e6:.0f} MB of fp32 weights")


def test_no_eval_text_reports_the_measured_row(tmp_path, caplog):
    trained = trained_bundle(tmp_path)
    with caplog.at_level("WARNING", logger="gptedge.quantize.api"):
        bundle = quantize(trained.bundle, Int4Config(format="qdq"), tmp_path / "q")
    assert "quality" not in bundle.manifest.history[-1]
    message = " ".join(record.getMessage() for record in caplog.records)
    assert f"int4-qdq measured {SMOLLM2_MEASURED_PCT['int4-qdq']:+.2f} %" in message
    assert "budget 3 %" in message and "--eval" in message
    assert ungated_note(Int4Config()) != ungated_note(Int4Config(format="qdq"))
