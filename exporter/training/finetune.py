"""Prune the decoder, then win back quality with a short fine-tune on a text (masks held fixed).

``gptedge export SOURCE -o OUT --prune 2:4 --finetune-steps 200 --finetune-text train.txt``:
the checkpoint is pruned in torch (:mod:`gptedge.exporter.training.prune`), fine-tuned with the trainer's
batching, loss, AdamW groups and learning-rate schedule (:mod:`gptedge.exporter.training.train`), and then
exported like any checkpoint. Zeroed weights are zeroed again after every optimizer step, so
the exported weights keep the sparsity pattern (2:4 stays 2:4); structurally pruned matrices are
simply smaller and train as they are.

The text is tokenized with the checkpoint's own tokenizer; its first 90 % trains, its last 10 %
is held out and scores the model before pruning, right after pruning (one-shot) and after the
fine-tune, so the manifest records both numbers (as perplexity per token on those windows).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gptedge.exporter.checkpoints import TokenizerFiles
from gptedge.exporter.config import ExportConfig
from gptedge.exporter.model import Decoder
from gptedge.exporter.training import prune as pruning
from gptedge.exporter.training.corpus import VAL_FRACTION
from gptedge.exporter.training.train import (
    TrainConfig,
    estimate_losses,
    learning_rate,
    make_optimizer,
    next_token_loss,
    sample_batch,
)
from gptedge.runtime.errors import GenerationError, InputError
from gptedge.runtime.tokenizer import CharTokenizer, HfTokenizer, Llama2cTokenizer, Tokenizer

log = logging.getLogger(__name__)

BATCH_SIZE = 8
MAX_BLOCK = 128  # tokens per training window: enough context to recover, cheap on a CPU
EVAL_BATCHES = 8


def prune_and_recover(decoder: Decoder, tokenizer: TokenizerFiles | None,
                      config: ExportConfig) -> tuple[Decoder, dict[str, Any]]:
    """Prune ``decoder`` per ``config.prune_method``/``sparsity``, fine-tune it for
    ``config.finetune_steps`` on ``config.finetune_text``; returns the decoder to export (a new,
    smaller one for ``structured``) and the manifest history record."""
    data = _token_data(config.finetune_text, tokenizer, decoder.arch.max_context) if config.finetune_text else None
    run = _run_config(config, decoder.arch.max_context)
    for param in decoder.parameters():  # own copies: the caller's checkpoint tensors stay intact
        param.data = param.data.clone()
    record: dict[str, Any] = {"step": "prune", "method": config.prune_method, "sparsity": config.sparsity}
    ppl: dict[str, float] = {"dense": _perplexity(decoder, data, run)} if data else {}
    dense_width = decoder.arch.intermediate_size
    masks: dict[str, torch.Tensor] = {}
    if config.prune_method == "structured":
        decoder = pruning.prune_mlp_neurons(decoder, config.sparsity)
        record["intermediate_size"] = decoder.arch.intermediate_size
        if config.prune_heads:
            decoder = pruning.prune_attention_heads(decoder, config.prune_heads)
            record.update(prune_heads=config.prune_heads, num_heads=decoder.arch.num_heads,
                          num_kv_heads=decoder.arch.num_kv_heads)
    else:
        masks = pruning.prune_unstructured(decoder, config.prune_method, config.sparsity)
    if data:
        ppl["one_shot"] = _perplexity(decoder, data, run)
    if config.finetune_steps:
        assert data is not None  # ExportConfig refuses finetune_steps without finetune_text
        record["finetune"] = _finetune(decoder, masks, data["train"], run)
        record["finetune"]["text"] = str(config.finetune_text)
        ppl["finetuned"] = _perplexity(decoder, data, run)
    record["sparsity_reached"] = pruning.reached_sparsity(decoder, config.prune_method, dense_width)
    if ppl:
        record["heldout_perplexity"] = ppl
        record["heldout_tokens"] = EVAL_BATCHES * BATCH_SIZE * run.block_size
    log.info("pruned %s %.2f: %s", config.prune_method, config.sparsity, ppl or "(no text, not scored)")
    return decoder.eval(), record


def _run_config(config: ExportConfig, context: int) -> TrainConfig:
    # The trainer's config carries what its helpers read (block, batch, lr schedule, decay, clip);
    # its model-size fields are unused here.
    steps = max(1, config.finetune_steps)
    return TrainConfig(block_size=min(context, MAX_BLOCK), batch_size=BATCH_SIZE, steps=steps,
                       lr=config.finetune_lr, warmup_steps=min(20, steps // 10), weight_decay=0.0,
                       eval_iters=EVAL_BATCHES, seed=1337)


def _finetune(decoder: Decoder, masks: dict[str, torch.Tensor], tokens: torch.Tensor,
              run: TrainConfig) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(run.seed)
    optimizer = make_optimizer(decoder, run)
    decoder.train()
    losses: list[float] = []
    start = time.perf_counter()
    with torch.enable_grad():
        for step in range(run.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, run)
            loss = next_token_loss(decoder, *sample_batch(tokens, run, generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), run.grad_clip)
            optimizer.step()
            pruning.apply_masks(decoder, masks)  # pruned weights stay pruned
            losses.append(loss.item())
    decoder.eval()
    tail = losses[-max(1, len(losses) // 10):]  # one step's loss is noisy: average the last 10 %
    return {"steps": run.steps, "lr": run.lr, "batch_size": run.batch_size, "block_size": run.block_size,
            "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "seconds": round(time.perf_counter() - start, 2)}


def _perplexity(decoder: Decoder, data: dict[str, torch.Tensor], run: TrainConfig) -> float:
    return math.exp(estimate_losses(decoder, {"val": data["val"]}, run)["val"])


def _token_data(path: Path, files: TokenizerFiles | None, context: int) -> dict[str, torch.Tensor]:
    """{"train", "val"}: the text's ids split 90/10; InputError when it cannot train and score."""
    tokenizer = _open_tokenizer(path, files)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--finetune-text {path}: cannot read it as UTF-8 text ({exc})") from exc
    try:
        ids = [i for chunk in _chunks(text) for i in tokenizer.encode(chunk)]
    except GenerationError as exc:
        raise InputError(f"--finetune-text {path}: {exc}") from exc
    cut = int(len(ids) * (1 - VAL_FRACTION))
    need = min(context, MAX_BLOCK) + 2
    if len(ids) - cut < need:
        raise InputError(f"--finetune-text {path}: only {len(ids)} tokens; need at least "
                         f"{math.ceil(need / VAL_FRACTION)} (10 % is held out to score the pruning)")
    tokens = torch.tensor(ids, dtype=torch.long)
    return {"train": tokens[:cut], "val": tokens[cut:]}


def _chunks(text: str, size: int = 8192) -> list[str]:
    # Whole lines, ~size characters each: llama2.c's merge loop is quadratic in the input length.
    chunks, current = [], []
    length = 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            chunks.append("".join(current))
            current, length = [], 0
    return chunks + (["".join(current)] if current else [])


def _open_tokenizer(path: Path, files: TokenizerFiles | None) -> Tokenizer:
    info = files.info if files else None
    if files is None or info is None or info.kind == "none" or not info.file or info.file not in files.files:
        raise InputError(f"--finetune-text {path}: the checkpoint has no tokenizer to encode it with; "
                         "pass --tokenizer")
    data = files.files[info.file]
    if info.kind == "hf":
        with tempfile.TemporaryDirectory() as folder:  # tokenizers reads files only
            file = Path(folder) / info.file
            file.write_bytes(data)
            return HfTokenizer(str(file))
    parsed = json.loads(data)
    if info.kind == "char":
        return CharTokenizer(parsed["itos"])
    if info.kind == "llama2c":
        return Llama2cTokenizer(parsed["pieces"], parsed["scores"])
    raise InputError(f"--finetune-text: unknown tokenizer kind {info.kind!r}")

