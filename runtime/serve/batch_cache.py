"""The server's running batch: ragged rows sharing one KV cache on onnxruntime's portable graph.

Every row keeps its own length and positions. Rows are right-aligned: a row's real tokens are the
last ``n`` columns of the cache, the columns before them are left padding that the attention mask
hides (mask 0). A new request is prefilled alone (batch 1, the same graph ``Generator.generate``
runs) and joins at a step boundary by copying its cache into the batch; finished or cancelled rows
leave the same way. Each such change rebuilds the batch cache once, dropping leading columns no
row uses any more, so the cache is never longer than its longest row. Between changes the cache
stays inside the backend (an OrtValue per layer), stepped like any other state.

Only onnxruntime states can be taken apart and put together (``kv_arrays`` / ``state_from``):
TensorRT keeps its cache in engine-owned CUDA buffers, so the server runs on ort-cpu or ort-cuda.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from gptedge.runtime.ort.backend import OrtBackend, OrtState


def kv_arrays(state: OrtState) -> list[np.ndarray]:
    """The cache of ``state`` as host arrays ``[B, kv_heads, length, head_dim]``, one per
    ``past_key_values.*`` input (views where the state already lives in numpy buffers)."""
    if state.buffers is not None:  # the in-place variant: preallocated buffers, length columns used
        return [buffer[:, :, :state.length] for buffer in state.buffers]
    return [value.numpy() for value in state.past]


def state_from(backend: OrtBackend, arrays: Sequence[np.ndarray]) -> OrtState:
    """A backend state holding ``arrays`` (``[B, kv_heads, length, head_dim]`` each) as its cache."""
    past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), backend.device, 0) for a in arrays]
    return OrtState(batch=arrays[0].shape[0], past=past, bindings={}, length=arrays[0].shape[2])


@dataclass
class Joiner:
    """A prefilled request waiting to join: its own batch-1 ``state`` holding ``length`` tokens."""

    key: Hashable
    state: OrtState
    length: int


def prefill(backend: OrtBackend, ids: Sequence[int]) -> tuple[OrtState, np.ndarray]:
    """Run prompt ``ids`` alone from an empty cache; returns (its state, last logits ``[V]``, a copy)."""
    state = backend.new_state(1)
    arr = np.asarray([ids], dtype=np.int64)
    logits = backend.step(state, arr, np.ones_like(arr), np.arange(len(ids), dtype=np.int64)[None])
    return state, np.array(logits[0], dtype=np.float32)


class BatchCache:
    """The rows of the running batch (by key, in batch order) and their shared cache."""

    def __init__(self, backend: OrtBackend, max_context: int) -> None:
        self.backend = backend
        self.max_context = max_context
        self.keys: list[Hashable] = []
        self.state: OrtState | None = None
        self.mask = np.zeros((0, max_context), dtype=np.int64)
        self.length = 0  # columns in the cache, padding included
        self.positions = np.zeros((0, 1), dtype=np.int64)  # each row's real tokens so far = its next position

    def __len__(self) -> int:
        return len(self.keys)

    def rebuild(self, keep: Sequence[Hashable], join: Sequence[Joiner]) -> None:
        """Make the batch ``keep`` (rows already in it, any order) followed by ``join``: one copy
        of the cache, right-aligned, as long as its longest row."""
        old = kv_arrays(self.state) if self.state is not None and keep else []
        index = {key: r for r, key in enumerate(self.keys)}
        rows = [index[key] for key in keep]
        lengths = [int(self.positions[r, 0]) for r in rows] + [j.length for j in join]
        self.keys = [*keep, *(j.key for j in join)]
        if not self.keys:
            self.state, self.length = None, 0
            self.mask = np.zeros((0, self.max_context), dtype=np.int64)
            self.positions = np.zeros((0, 1), dtype=np.int64)
            return
        width = max(lengths)
        joined = [kv_arrays(j.state) for j in join]
        arrays = []
        for layer in range(len(old) if old else len(joined[0])):
            sample = old[layer] if old else joined[0][layer]
            out = np.zeros((len(self.keys), sample.shape[1], width, sample.shape[3]), dtype=sample.dtype)
            for b, r in enumerate(rows):  # a kept row: its last n columns move to the end
                n = lengths[b]
                out[b, :, width - n:] = old[layer][r, :, self.length - n:self.length]
            for b, kv in enumerate(joined, start=len(rows)):
                out[b, :, width - lengths[b]:] = kv[layer][0]
            arrays.append(out)
        self.mask = np.zeros((len(self.keys), self.max_context), dtype=np.int64)
        for b, n in enumerate(lengths):
            self.mask[b, width - n:width] = 1
        self.positions = np.asarray(lengths, dtype=np.int64)[:, None]
        self.length = width
        self.state = state_from(self.backend, arrays)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row (``tokens [B, 1]`` int64, batch order) and return the logits
        ``[B, V]`` (valid until the next step). Every row's next position moves on by one."""
        assert self.state is not None and tokens.shape == (len(self.keys), 1)
        end = self.length + 1
        assert end <= self.max_context, "requests are checked to fit the context before they run"
        self.mask[:, self.length] = 1
        logits = self.backend.step(self.state, tokens, self.mask[:, :end], self.positions.copy())
        self.length = end
        self.positions += 1
        return logits
