"""`gptedge export --prune ... --finetune-steps N`: pruning costs quality, the fine-tune wins it back,
and the exported weights keep the pruning (2:4 pattern intact, structured matrices smaller)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gptedge.exporter import ExportConfig, export
from gptedge.exporter.training.corpus import load_corpus
from gptedge.exporter.training.train import TrainConfig, train_on
from gptedge.quantize import PruneConfig, quantize
from gptedge.quantize.evaluate import perplexity
from gptedge.runtime.cli import main
from gptedge.runtime.errors import InputError

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, steps=200, batch_size=16, lr=1e-2,
            warmup_steps=10, eval_interval=200, eval_iters=2, threads=1)
STEPS, LR = "80", "3e-3"
FAST = dict(validate=False, last_logits_variant=False)  # one-shot bundles are only scored


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny char GPT trained for a few seconds, exported dense, one-shot pruned and fine-tuned."""
    root = tmp_path_factory.mktemp("prune_ft")
    corpus = load_corpus(None)
    train_text, val_text = corpus.split()
    (root / "train.txt").write_text(train_text[:100_000])
    (root / "val.txt").write_text(val_text[:6_000])
    ckpt = train_on(corpus, TrainConfig(out_dir=root / "ckpt", **TINY))
    export(ckpt, ExportConfig(**FAST), root / "dense")
    export(ckpt, ExportConfig(prune_method="2:4", **FAST), root / "p24")
    export(ckpt, ExportConfig(prune_method="structured", sparsity=0.75, **FAST), root / "st")
    export(ckpt, ExportConfig(prune_method="2:4", finetune_steps=int(STEPS), finetune_text=root / "train.txt",
                              finetune_lr=float(LR)), root / "p24ft")
    code = main(["export", str(ckpt), "-o", str(root / "stft"), "--prune", "structured", "--sparsity", "0.75",
                 "--finetune-steps", STEPS, "--finetune-text", str(root / "train.txt"), "--finetune-lr", LR])
    assert code == 0
    return root


def ppl(root, name: str) -> float:
    return perplexity(root / name, root / "val.txt").ppl


def weights(bundle) -> dict[str, np.ndarray]:
    model = onnx.load(str(bundle / "model.onnx"))  # loads model.onnx.data beside it
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def history(bundle) -> dict:
    from gptedge.runtime.bundle import load_bundle
    return load_bundle(bundle).manifest.history[-1]


@pytest.mark.parametrize("method", ["p24", "st"])
def test_one_shot_costs_quality_and_finetune_wins_it_back(pruned, method):
    dense, one_shot, tuned = ppl(pruned, "dense"), ppl(pruned, method), ppl(pruned, method + "ft")
    assert one_shot > dense * 1.005
    assert tuned < one_shot
    record = history(pruned / (method + "ft"))  # the exporter's own held-out numbers agree
    scores = record["heldout_perplexity"]
    assert scores["one_shot"] > scores["dense"] and scores["finetuned"] < scores["one_shot"]
    assert record["finetune"]["steps"] == int(STEPS) and record["finetune"]["final_loss"] > 0
    assert record["sparsity_reached"] == pytest.approx(0.5 if method == "p24" else 0.75, abs=0.01)


def test_two_four_pattern_survives_finetuning(pruned):
    tuned, before = weights(pruned / "p24ft"), weights(pruned / "dense")
    blocks = [n for n in tuned if n.startswith("layers.") and n.endswith("weight_t")]
    assert len(blocks) == 2 * 4  # qkv, out, up, down per layer
    for name in blocks:
        w = tuned[name]  # [in, out]: groups of 4 consecutive inputs per output
        nonzero = (w.reshape(w.shape[0] // 4, 4, -1) != 0).sum(axis=1)
        assert nonzero.max() <= 2, name
        assert not np.allclose(w, np.where(w != 0, before[name], 0)), f"{name} was not fine-tuned"
    assert (tuned["lm_head.weight_t"] != 0).all()  # the tied embedding / LM head table stays dense
    assert load_precision(pruned / "p24ft")["sparsity"] == {"method": "2:4", "fraction": 0.5}


def load_precision(bundle) -> dict:
    from gptedge.runtime.bundle import load_bundle
    return load_bundle(bundle).manifest.precision


def test_structured_matrices_really_shrink(pruned):
    tuned, dense = weights(pruned / "stft"), weights(pruned / "dense")
    for i in range(2):
        assert dense[f"layers.{i}.mlp.up.weight_t"].shape == (64, 256)
        assert tuned[f"layers.{i}.mlp.up.weight_t"].shape == (64, 64)
        assert tuned[f"layers.{i}.mlp.down.weight_t"].shape == (64, 64)
    assert history(pruned / "stft")["intermediate_size"] == 64
    from gptedge.runtime.bundle import load_bundle
    assert load_bundle(pruned / "stft").manifest.architecture.intermediate_size == 64
    assert (pruned / "stft" / "model_last.onnx").is_file()  # the generation graph too


@pytest.mark.parametrize("method", ["2:4", "structured"])
def test_same_selection_rules_as_the_onnx_pruner(pruned, tmp_path, method):
    # Without fine-tuning, torch-side pruning must pick exactly what `gptedge quantize --mode prune` picks.
    sparsity = 0.5 if method == "2:4" else 0.75
    out = quantize(pruned / "dense", PruneConfig(method=method, sparsity=sparsity), tmp_path / "q")
    ours = weights(pruned / ("p24" if method == "2:4" else "st"))
    theirs = weights(out.path)
    for name, w in theirs.items():
        if name in ours:
            np.testing.assert_allclose(ours[name], w, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prune_method="2:4", sparsity=0.25), "2:4"),
    (dict(prune_method="magnitude", sparsity=0.0), "--sparsity"),
    (dict(prune_method="magnitude", sparsity=1.0), "--sparsity"),
    (dict(prune_method="structured", sparsity=-0.5), "--sparsity"),
    (dict(prune_method="wanda"), "--prune"),
    (dict(prune_method="2:4", finetune_steps=10), "--finetune-text"),
    (dict(prune_method="2:4", finetune_steps=-1, finetune_text="t.txt"), "--finetune-steps"),
    (dict(finetune_steps=10, finetune_text="t.txt"), "--prune"),
    (dict(prune_method="2:4", finetune_steps=10, finetune_text="t.txt", finetune_lr=0.0), "--finetune-lr"),
])
def test_config_refuses_bad_values(kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        ExportConfig(**kwargs)


def test_cli_refuses_before_loading(tmp_path, capsys):
    code = main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--prune", "2:4",
                 "--sparsity", "0.3"])
    assert code == InputError.exit_code
    assert "2:4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
