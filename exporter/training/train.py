"""Train a tiny nanoGPT-format GPT on a text file, on the CPU, and write nanoGPT's ``ckpt.pt``.

The result is byte-for-byte the kind of folder nanoGPT's ``train.py`` leaves behind after
``data/shakespeare_char/prepare.py``: ``ckpt.pt`` ({"model", "optimizer", "model_args",
"iter_num", "best_val_loss", "config"}, parameter names ``transformer.wte`` ... ``lm_head``) and a
char-level ``meta.pkl`` ({"vocab_size", "itos", "stoi"}). So the demo exercises the real nanoGPT
loader, and anything written here is also loadable by nanoGPT's own ``sample.py``.

The model is gptedge's :class:`~gptedge.exporter.model.Decoder` configured as nanoGPT's GPT
(LayerNorm, learned positions, exact-erf GELU, tied head); its parameter names are mapped to
nanoGPT's on save. ``train_log.json`` next to the checkpoint keeps the loss curve.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from gptedge.exporter.model import Decoder
from gptedge.exporter.training.corpus import Corpus, load_corpus
from gptedge.runtime.bundle import Architecture, atomic_output_dir
from gptedge.runtime.errors import InputError

log = logging.getLogger(__name__)

CKPT_NAME = "ckpt.pt"
META_NAME = "meta.pkl"
LOG_NAME = "train_log.json"


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Sizes are counts; ``lr`` is AdamW's peak learning rate (linear warm-up
    over ``warmup_steps``, then cosine decay to ``lr / 10``). ``text`` None trains on the Python
    standard library's source (see :mod:`gptedge.exporter.training.corpus`). ``dropout`` must be 0: the
    export decoder has no dropout layers (nanoGPT's tiny configs use 0 on the CPU too).
    ``threads`` None: time 1 and 2 torch threads at the start and at every evaluation, keep the
    faster (see :func:`pick_threads`)."""

    text: Path | None = None
    out_dir: Path = Path("out-tiny")
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = False
    steps: int = 500
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    eval_interval: int = 100
    eval_iters: int = 10
    device: str = "cpu"
    threads: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        problems = [f"{name}={getattr(self, name)!r} must be a positive integer"
                    for name in ("n_layer", "n_head", "n_embd", "block_size", "steps", "batch_size",
                                 "eval_interval", "eval_iters")
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if not problems and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.dropout != 0.0:
            problems.append(f"dropout={self.dropout}: only 0.0 is supported (the decoder has no dropout)")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            problems.append("lr must be > 0 and warmup_steps, weight_decay, grad_clip >= 0")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            problems.append(f"device={self.device!r} must be 'cpu' or 'cuda[:N]'")
        if problems:
            raise InputError("invalid training config: " + "; ".join(problems))
        if self.text is not None:
            object.__setattr__(self, "text", Path(self.text))
        object.__setattr__(self, "out_dir", Path(self.out_dir))


@dataclass(frozen=True)
class TrainEvent:
    """Progress report: after optimizer step ``step`` of ``steps``; ``loss`` is that step's training
    loss (nats/char); ``val_loss`` is set on evaluation steps (step 0 = the untrained model)."""

    step: int
    steps: int
    loss: float | None = None
    val_loss: float | None = None


@dataclass
class TrainResult:
    """What a run measured (losses in nats per character)."""

    untrained_val_loss: float
    val_loss: float
    train_loss: float
    seconds: float
    evals: list[dict[str, float]] = field(default_factory=list)


def architecture(config: TrainConfig, vocab_size: int) -> Architecture:
    """nanoGPT's GPT in the decoder's terms (LayerNorm eps 1e-5, biases per ``config.bias``)."""
    bias = config.bias
    return Architecture(
        vocab_size=vocab_size, hidden_size=config.n_embd, num_layers=config.n_layer,
        num_heads=config.n_head, num_kv_heads=config.n_head, head_dim=config.n_embd // config.n_head,
        intermediate_size=4 * config.n_embd, max_context=config.block_size, norm="layernorm",
        norm_eps=1e-5, norm_bias=bias, position="learned", activation="gelu", qkv_bias=bias,
        attn_out_bias=bias, mlp_bias=bias, tie_word_embeddings=True)


def nanogpt_name(name: str) -> str:
    """The nanoGPT parameter name of a decoder parameter (``layers.0.attn.qkv.weight`` ->
    ``transformer.h.0.attn.c_attn.weight``)."""
    if name == "lm_head.weight":
        return name
    for ours, theirs in (("embed.", "wte."), ("pos_embed.", "wpe."), ("norm.", "ln_f.")):
        if name.startswith(ours):
            return "transformer." + theirs + name[len(ours):]
    _, index, rest = name.split(".", 2)
    for ours, theirs in (("attn_norm.", "ln_1."), ("mlp_norm.", "ln_2."), ("attn.qkv.", "attn.c_attn."),
                         ("attn.out.", "attn.c_proj."), ("mlp.up.", "mlp.c_fc."), ("mlp.down.", "mlp.c_proj.")):
        if rest.startswith(ours):
            return f"transformer.h.{index}.{theirs}{rest[len(ours):]}"
    raise AssertionError(f"no nanoGPT name for decoder parameter {name}")


def train(config: TrainConfig, progress: Callable[[TrainEvent], None] | None = None) -> Path:
    """Train on ``config.text`` and write ``ckpt.pt``, ``meta.pkl`` and ``train_log.json`` into
    ``config.out_dir`` (atomically). Returns the path of ``ckpt.pt``."""
    corpus = load_corpus(config.text)
    return train_on(corpus, config, progress)


def train_on(corpus: Corpus, config: TrainConfig,
             progress: Callable[[TrainEvent], None] | None = None) -> Path:
    """:func:`train` on an already loaded corpus."""
    torch.manual_seed(config.seed)
    chars = sorted(set(corpus.text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    train_text, val_text = corpus.split()
    data = {"train": _encode(train_text, stoi), "val": _encode(val_text, stoi)}
    if min(len(d) for d in data.values()) <= config.block_size + 1:
        raise InputError(f"--text: too short for block_size={config.block_size} "
                         f"({len(corpus.text)} characters); give a longer text or a smaller block size")
    model = Decoder(architecture(config, len(chars))).to(config.device)
    _init_like_nanogpt(model, config.n_layer)
    optimizer = make_optimizer(model, config)
    threads = torch.get_num_threads()
    try:
        result = _fit(model, optimizer, data, config, progress)
    finally:
        torch.set_num_threads(threads)  # the choice made for training is not the caller's
    log.info("trained %d steps in %.1f s: val loss %.3f (untrained %.3f)",
             config.steps, result.seconds, result.val_loss, result.untrained_val_loss)
    with atomic_output_dir(config.out_dir, overwrite=config.overwrite) as tmp:
        torch.save(_checkpoint(model, optimizer, config, corpus, result), tmp / CKPT_NAME)
        meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
        with open(tmp / META_NAME, "wb") as handle:
            pickle.dump(meta, handle)
        (tmp / LOG_NAME).write_text(json.dumps(asdict(result), indent=1))
    return config.out_dir / CKPT_NAME


def _encode(text: str, stoi: dict[str, int]) -> torch.Tensor:
    return torch.tensor([stoi[ch] for ch in text], dtype=torch.long)


def _init_like_nanogpt(model: Decoder, n_layer: int) -> None:
    # nanoGPT: N(0, 0.02) for linears and embeddings, zero biases, residual projections scaled by
    # 1/sqrt(2 * n_layer) (GPT-2 paper); LayerNorms keep weight 1, bias 0.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                continue
            if name.endswith("bias"):
                param.zero_()
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                param.normal_(0.0, 0.02 / math.sqrt(2 * n_layer))
            else:
                param.normal_(0.0, 0.02)


def make_optimizer(model: Decoder, config: TrainConfig) -> torch.optim.AdamW:
    # nanoGPT's configure_optimizers: weight decay on matrices only, betas (0.9, 0.99) for tiny models.
    params = list({id(p): p for p in model.parameters()}.values())  # the tied head counts once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``config.lr``, then cosine decay to ``config.lr / 10`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    span = max(1, config.steps - config.warmup_steps)
    ratio = min(1.0, (step - config.warmup_steps) / span)
    min_lr = config.lr / 10
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.lr - min_lr)


def sample_batch(data: torch.Tensor, config: TrainConfig, generator: torch.Generator):
    starts = torch.randint(len(data) - config.block_size - 1, (config.batch_size,), generator=generator)
    x = torch.stack([data[i:i + config.block_size] for i in starts])  # B, T
    y = torch.stack([data[i + 1:i + 1 + config.block_size] for i in starts])
    return x.to(config.device), y.to(config.device)


def next_token_loss(model: Decoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    B, T = x.shape
    positions = torch.arange(T, device=x.device).expand(B, T)
    mask = torch.ones(B, T, dtype=torch.long, device=x.device)
    shape = (B, model.arch.num_kv_heads, 0, model.arch.head_dim)
    past = [(x.new_zeros(shape, dtype=torch.float32), x.new_zeros(shape, dtype=torch.float32))
            for _ in range(model.arch.num_layers)]
    logits, _ = model(x, mask, positions, past)  # B, T, V
    return F.cross_entropy(logits.reshape(B * T, -1), y.reshape(B * T))


@torch.no_grad()
def estimate_losses(model: Decoder, data: dict[str, torch.Tensor], config: TrainConfig) -> dict[str, float]:
    # A fixed generator: every evaluation sees the same batches, so the curve is comparable.
    model.eval()
    out = {}
    for split, tokens in data.items():
        generator = torch.Generator().manual_seed(config.seed + 1)
        losses = [next_token_loss(model, *sample_batch(tokens, config, generator)).item() for _ in range(config.eval_iters)]
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def _fit(model, optimizer, data, config: TrainConfig, progress) -> TrainResult:
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    evals = []
    loss = None
    for step in range(config.steps + 1):
        if step % config.eval_interval == 0 or step == config.steps:
            if step < config.steps:
                torch.set_num_threads(config.threads or pick_threads(model, data["train"], config))
            losses = estimate_losses(model, data, config)
            evals.append({"step": step, "train": losses["train"], "val": losses["val"]})
            if progress:
                progress(TrainEvent(step, config.steps, loss, losses["val"]))
        if step == config.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss_t = next_token_loss(model, *sample_batch(data["train"], config, generator))
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        loss = loss_t.item()
        if progress:
            progress(TrainEvent(step + 1, config.steps, loss, None))
    return TrainResult(untrained_val_loss=evals[0]["val"], val_loss=evals[-1]["val"],
                       train_loss=evals[-1]["train"], seconds=time.perf_counter() - start, evals=evals)


def pick_threads(model: Decoder, tokens: torch.Tensor, config: TrainConfig) -> int:
    """1 or 2 torch threads, whichever runs a training step faster right now.

    Why measure: torch's OpenMP workers spin-wait, so when other busy processes share the cores,
    2 threads ran a step ~3x SLOWER than 1 on our 2-vCPU machine (and ~1.8x faster when it was
    idle). Costs about three forward+backward passes; gradients are discarded."""
    most = min(2, os.cpu_count() or 1)
    if most == 1:
        return 1
    x, y = sample_batch(tokens, config, torch.Generator().manual_seed(0))
    best: tuple[float, int] | None = None
    for threads in (1, most):
        torch.set_num_threads(threads)
        timings = []
        for _ in range(2):  # the first pass after a switch also starts the thread pool
            begin = time.perf_counter()
            next_token_loss(model, x, y).backward()
            timings.append(time.perf_counter() - begin)
        model.zero_grad(set_to_none=True)
        if best is None or min(timings) < best[0]:
            best = (min(timings), threads)
    assert best is not None  # the loop ran at least once
    log.debug("torch threads: %d (%.3f s per step)", best[1], best[0])
    return best[1]


def _checkpoint(model: Decoder, optimizer, config: TrainConfig, corpus: Corpus,
                result: TrainResult) -> dict[str, Any]:
    state = {nanogpt_name(k): v.detach().cpu() for k, v in model.state_dict().items()}
    model_args = {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
                  "block_size": config.block_size, "bias": config.bias,
                  "vocab_size": model.arch.vocab_size, "dropout": config.dropout}
    run = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in asdict(config).items()}
    # nanoGPT's config keys, plus what lets a rerun tell whether this checkpoint matches it.
    run.update({"dataset": corpus.dataset, "text_sha256": corpus.sha256, "max_iters": config.steps,
                "learning_rate": config.lr, "init_from": "scratch", "trainer": "gptedge.exporter.train"})
    return {"model": state, "optimizer": optimizer.state_dict(), "model_args": model_args,
            "iter_num": config.steps, "best_val_loss": min(e["val"] for e in result.evals), "config": run}


def matches(ckpt_path: str | os.PathLike[str], config: TrainConfig, corpus: Corpus) -> bool:
    """True when ``ckpt_path`` was written by :func:`train` with this config and this text (so a
    rerun can reuse it). Only the fields that change the weights are compared."""
    path = Path(ckpt_path)
    if not path.is_file() or not path.with_name(META_NAME).is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True).get("config", {})
    except Exception as exc:  # any unreadable file simply does not match: retrain
        log.warning("%s: cannot read (%s); it will be retrained", path, exc)
        return False
    wanted = {k: v for k, v in asdict(config).items() if k not in ("out_dir", "text", "overwrite", "threads")}
    same = all(saved.get(k) == v for k, v in wanted.items())
    return same and saved.get("text_sha256") == corpus.sha256
