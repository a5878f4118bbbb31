"""A pure-numpy Backend whose logits depend only on (token, position), and a bundle around it.

Imports numpy and gptedge.runtime only (never torch or onnx), so the generate loop can be tested,
and shown to run, without an exported graph. The fake keeps the protocol as a real backend does:
it refuses a mask that disagrees with its cache length, returns a view of one output buffer per
state (rewritten by that state's next step) and reads its inputs when a step runs, so arrays the
caller reuses and rewrites in place give the new results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptedge.runtime.bundle import Architecture, Bundle, Manifest, TokenizerInfo
from gptedge.runtime.errors import GenerationError

# Character vocabulary of the fake bundle: id i <-> CHARS[i] (the char tokenizer of nanoGPT bundles).
CHARS = "abcdefghijklmnop"
VOCAB = len(CHARS)
PREFERRED_BONUS = 3.0  # the logit the preferred token gets on top of the +-0.3 background


def fake_logits(tokens: np.ndarray, positions: np.ndarray, vocab: int = VOCAB) -> np.ndarray:
    """Logits ``[..., vocab]`` float32 for token ids and positions of the same shape: token
    ``(t + 1) % vocab`` leads by ~3, the rest is a small position-dependent background."""
    t = np.asarray(tokens, dtype=np.int64)[..., None]
    p = np.asarray(positions, dtype=np.int64)[..., None]
    v = np.arange(vocab)
    logits = 0.3 * np.cos(0.7 * v + 1.3 * p)
    logits = logits + PREFERRED_BONUS * (v == (t + 1) % vocab)
    return logits.astype(np.float32)


@dataclass
class Call:
    """What one ``step`` received: the arrays themselves (to check identity) and copies of their
    contents at call time (they are rewritten in place afterwards)."""

    state: FakeState
    ids_obj: np.ndarray
    mask_obj: np.ndarray
    pos_obj: np.ndarray
    ids: np.ndarray
    mask: np.ndarray
    pos: np.ndarray


@dataclass
class FakeState:
    batch: int
    out: np.ndarray  # [B, V]: the one output buffer of this state (step returns it)
    length: int = 0


class FakeBackend:
    """The Backend protocol in pure numpy. ``poison``: step index (0 = the first step of any
    state) -> value written into logits column 0 at that step (NaN/inf tests)."""

    name = "fake"

    def __init__(self, vocab: int = VOCAB, poison: dict[int, float] | None = None) -> None:
        self.vocab = vocab
        self.poison = dict(poison or {})
        self.calls: list[Call] = []
        self.closed = 0

    def new_state(self, batch: int) -> FakeState:
        return FakeState(batch, np.empty((batch, self.vocab), np.float32))

    def step(self, state: FakeState, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        _check_inputs(input_ids, attention_mask, position_ids, state.batch, state.length)
        self.calls.append(Call(state, input_ids, attention_mask, position_ids, input_ids.copy(),
                               attention_mask.copy(), position_ids.copy()))
        state.out[:] = fake_logits(input_ids[:, -1], position_ids[:, -1], self.vocab)
        if len(self.calls) - 1 in self.poison:
            state.out[:, 0] = self.poison[len(self.calls) - 1]
        state.length += input_ids.shape[1]
        return state.out

    def full_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                    position_ids: np.ndarray) -> np.ndarray:
        _check_inputs(input_ids, attention_mask, position_ids, input_ids.shape[0], 0)
        return fake_logits(input_ids, position_ids, self.vocab)

    def close(self) -> None:
        self.closed += 1


def _check_inputs(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, batch: int, past: int) -> None:
    """The shape and dtype checks of the contract (as the real backends make them)."""
    for name, array in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
        if array.dtype != np.int64 or array.ndim != 2 or array.shape[0] != batch:
            raise GenerationError(f"{name}: expected int64 [{batch}, n], got {array.dtype} {array.shape}")
    if pos.shape != ids.shape or mask.shape[1] != past + ids.shape[1]:
        raise GenerationError(f"attention_mask {mask.shape} / position_ids {pos.shape} do not fit input_ids "
                              f"{ids.shape} after {past} cached tokens")


def fake_bundle(folder: Path, eos: int | None = None, pad: int | None = None, max_context: int = 24) -> Bundle:
    """A Bundle object (no graph: only the generator reads it) with the char tokenizer of CHARS."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({"itos": list(CHARS)}), encoding="utf-8")
    arch = Architecture(vocab_size=VOCAB, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                        intermediate_size=8, max_context=max_context)
    tokenizer = TokenizerInfo(kind="char", file="vocab.json", eos_ids=() if eos is None else (eos,), pad_id=pad)
    return Bundle(folder, Manifest(architecture=arch, tokenizer=tokenizer))
