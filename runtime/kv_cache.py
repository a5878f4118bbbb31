"""One batch of sequences growing in a backend's KV cache: the attention mask of everything in the
cache, each row's next position, and the bounds check against ``max_context``.

The mask lives in one preallocated ``[batch, max_context]`` buffer; a step passes a slice of it,
so the per-token work does not grow with the context (batch 1: a zero-copy view).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gptedge.runtime.errors import GenerationError


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[B, L]`` and attention mask ``[B, L]`` of prompts padded on the LEFT to the
    longest one (pads: ``pad_id``, mask 0)."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    return ids, mask


class KVSequence:
    """``batch`` sequences extended step by step on ``backend`` (which owns the KV cache)."""

    def __init__(self, backend: Any, batch: int, max_context: int) -> None:
        self.backend = backend
        self.batch = batch
        self.max_context = max_context
        self.state = backend.new_state(batch)
        self.mask = np.zeros((batch, max_context), dtype=np.int64)
        self.length = 0  # tokens in the cache, pads included
        self.next_pos = np.zeros((batch, 1), dtype=np.int64)

    def feed(self, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Run ``ids [B, S]`` (``mask [B, S]``: 0 for left padding; None = all real tokens) and
        return the last position's logits ``[B, V]``. Pads get position 0 and real tokens count
        on from each row's previous position (``cumsum(mask) - 1``)."""
        seq = ids.shape[1]
        end = self.length + seq
        if end > self.max_context:
            raise GenerationError(f"{end} tokens do not fit in the model's context of {self.max_context} "
                                  "tokens; shorten the prompt or max_new_tokens")
        if mask is None:
            self.mask[:, self.length:end] = 1
            # one token: the backend reads next_pos during the step, it moves on afterwards (a decode
            # step runs right after ~100 MB of weights went through the caches, where every numpy
            # call costs ~20 us: fewer calls is what keeps the runtime's share of a step small)
            positions = self.next_pos + np.arange(seq, dtype=np.int64) if seq > 1 else self.next_pos
        else:
            self.mask[:, self.length:end] = mask
            counted = np.cumsum(mask, axis=1)
            positions = np.maximum(self.next_pos + counted - 1, 0)
        self.length = end
        view = self.mask[:, :end]  # contiguous for batch 1; the backend copies otherwise (B*T int64)
        logits = self.backend.step(self.state, ids, view, positions)
        if mask is not None:
            self.next_pos += counted[:, -1:]
        elif self.batch == 1:
            self.next_pos[0, 0] += seq  # an item update costs a tenth of the ufunc call below
        else:
            self.next_pos += seq
        return logits
