"""The tiny trainer: it really learns, and it writes exactly what nanoGPT's train.py writes."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from torch.nn import functional as F

from gptedge.exporter.training.corpus import load_corpus, stdlib_text
from gptedge.exporter.training.train import TrainConfig, learning_rate, matches, train
from gptedge.runtime.errors import InputError, OutputExistsError

TINY = dict(n_layer=2, n_head=2, n_embd=48, block_size=32, steps=80, batch_size=12, lr=1e-2,
            warmup_steps=10, eval_interval=40, eval_iters=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = TrainConfig(out_dir=tmp_path_factory.mktemp("train") / "run", **TINY)
    events = []
    ckpt = train(config, events.append)
    return config, ckpt, events


def nanogpt_logits(state: dict, args: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's GPT.forward written from its model.py with plain functional ops (independent of
    gptedge's decoder), reading the checkpoint's own parameter names."""
    B, T = idx.shape
    C, nh = args["n_embd"], args["n_head"]

    def ln(x, name):
        return F.layer_norm(x, (C,), state[name + ".weight"], state.get(name + ".bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, state[name + ".weight"], state.get(name + ".bias"))

    x = state["transformer.wte.weight"][idx] + state["transformer.wpe.weight"][:T]
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        q, k, v = linear(ln(x, h + "ln_1"), h + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + linear(y.transpose(1, 2).reshape(B, T, C), h + "attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, h + "ln_2"), h + "mlp.c_fc")), h + "mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), state["lm_head.weight"])


def test_training_lowers_val_loss_far_below_untrained(trained):
    config, ckpt, events = trained
    result = json.loads((ckpt.parent / "train_log.json").read_text())
    vocab = len(set(load_corpus(None).text))
    assert abs(result["untrained_val_loss"] - math.log(vocab)) < 0.3  # random init ~ uniform
    assert result["val_loss"] < result["untrained_val_loss"] - 1.0
    assert [e.val_loss is not None for e in events].count(True) == 3  # steps 0, 40, 80
    assert events[-1].step == config.steps


def test_checkpoint_is_nanogpt_format(trained):
    config, ckpt, _ = trained
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(data) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    args = data["model_args"]
    assert set(args) == {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}
    assert (args["n_layer"], args["n_embd"], args["bias"], args["dropout"]) == (2, 48, False, 0.0)
    per_layer = ["ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight",
                 "mlp.c_fc.weight", "mlp.c_proj.weight"]
    expected = ({"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                 "lm_head.weight"} | {f"transformer.h.{i}.{n}" for i in range(2) for n in per_layer})
    assert set(data["model"]) == expected
    assert data["model"]["transformer.h.0.attn.c_attn.weight"].shape == (3 * 48, 48)
    assert data["model"]["transformer.h.1.mlp.c_fc.weight"].shape == (4 * 48, 48)
    assert torch.equal(data["model"]["lm_head.weight"], data["model"]["transformer.wte.weight"])
    assert data["iter_num"] == config.steps and data["config"]["dataset"] == "python-stdlib"


def test_meta_pkl_and_independent_nanogpt_forward_agree(trained):
    _, ckpt, _ = trained
    meta = pickle.loads((ckpt.parent / "meta.pkl").read_bytes())
    assert set(meta) == {"vocab_size", "itos", "stoi"}
    assert meta["vocab_size"] == len(meta["itos"]) == len(meta["stoi"])
    assert all(meta["stoi"][meta["itos"][i]] == i for i in range(meta["vocab_size"]))
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    _, val = load_corpus(None).split()
    ids = torch.tensor([[meta["stoi"][c] for c in val[i:i + 33]] for i in (0, 1000, 5000, 9000)])
    with torch.no_grad():
        logits = nanogpt_logits(data["model"], data["model_args"], ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    log = json.loads((ckpt.parent / "train_log.json").read_text())
    assert loss < log["untrained_val_loss"] - 1.0  # nanoGPT's own forward sees the trained model


def test_matches_and_refuses_to_overwrite(trained):
    config, ckpt, _ = trained
    corpus = load_corpus(None)
    assert matches(ckpt, config, corpus)
    assert not matches(ckpt, TrainConfig(**{**TINY, "steps": 81}), corpus)
    with pytest.raises(OutputExistsError):
        train(config)


def test_text_file_and_config_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_corpus(tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("hello")
    with pytest.raises(InputError, match="characters"):
        load_corpus(short)
    with pytest.raises(InputError, match="multiple of n_head"):
        TrainConfig(n_embd=30, n_head=4)
    with pytest.raises(InputError, match="dropout"):
        TrainConfig(dropout=0.1)


def test_stdlib_corpus_is_deterministic_ascii():
    text = stdlib_text(200_000)
    assert text == stdlib_text(200_000) and len(text) == 200_000 and text.isascii()


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    assert learning_rate(0, config) < learning_rate(9, config) <= 1e-3
    assert learning_rate(100, config) == pytest.approx(1e-4)
