"""A tiny char-level GPT trained for real (a few seconds) and exported, shared by the quantize tests.

Quantization must be judged on a model that means something: a random model's perplexity is the
vocabulary size whatever you do to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gptedge.runtime.bundle import Architecture, TokenizerInfo

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
TRAIN_CHARS = 120_000


@dataclass(frozen=True)
class Trained:
    bundle: Path
    calib: Path  # text the model was trained on (first part)
    eval: Path  # held-out text
    short: Path  # shorter than one context window


def corpus() -> str:
    """tinyshakespeare beside the checkout, else the stdlib's argparse source (every machine has it)."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:TRAIN_CHARS]
    import argparse
    import inspect
    return inspect.getsource(argparse) * 2


def tiny_arch(vocab: int) -> Architecture:
    return Architecture(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=128, max_context=64, norm="rmsnorm", norm_eps=1e-5, norm_bias=False,
                        position="rope", activation="swiglu", qkv_bias=False, attn_out_bias=False,
                        mlp_bias=False, tie_word_embeddings=False)


_CACHE: dict[str, Trained] = {}


def trained_bundle(root: Path) -> Trained:
    """The trained bundle, built once per test session (in the first caller's ``root``)."""
    if "bundle" not in _CACHE:
        _CACHE["bundle"] = _train_and_export(root)
    return _CACHE["bundle"]


def _train_and_export(root: Path, steps: int = 250) -> Trained:
    """Train the tiny decoder on the corpus (next-char loss) and export it with a char tokenizer."""
    import torch
    from torch.nn import functional as F

    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.exporter.checkpoints import LoadedCheckpoint, TokenizerFiles
    from gptedge.exporter.model import Decoder, empty_past

    text = corpus()
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    cut = int(len(text) * 0.9)
    data = torch.tensor([stoi[c] for c in text[:cut]], dtype=torch.int64)
    arch = tiny_arch(len(itos))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast and does not fight other processes
    model = Decoder(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ctx, batch = arch.max_context, 16
    positions = torch.arange(ctx).expand(batch, ctx)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - ctx - 1, (batch,))
        x = torch.stack([data[s:s + ctx] for s in starts])
        y = torch.stack([data[s + 1:s + ctx + 1] for s in starts])
        logits, _ = model(x, torch.ones_like(x), positions, empty_past(arch, batch))
        loss = F.cross_entropy(logits.reshape(-1, arch.vocab_size), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tokenizer = TokenizerFiles(info=TokenizerInfo(kind="char", file="tokenizer.char.json", vocab_size=len(itos)),
                               files={"tokenizer.char.json": json.dumps({"itos": itos}).encode()})
    checkpoint = LoadedCheckpoint(arch=arch, state_dict=state, source={"format": "test-trained", "path": "memory"},
                                  tokenizer=tokenizer)
    bundle = root / "trained"
    export_loaded(checkpoint, ExportConfig(), bundle)
    calib, held, short = root / "calib.txt", root / "eval.txt", root / "short.txt"
    calib.write_text(text[:20_000], encoding="utf-8")
    held.write_text(text[cut:cut + 6_000], encoding="utf-8")
    short.write_text(text[:20], encoding="utf-8")
    return Trained(bundle, calib, held, short)
