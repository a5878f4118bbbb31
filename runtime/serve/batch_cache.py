"""The server's running batch: ragged rows sharing one KV cache, two ways.

:class:`VariantBatch` (used when the bundle has ``model_ort.onnx`` and runs on the CPU): rows are
LEFT-aligned in preallocated buffers and onnxruntime's GroupQueryAttention takes one valid length
per row (from ``position_ids``), appending each row's new keys/values in place -- no padding, no
per-step copy of the cache, the same fused kernels ``Generator.generate`` runs a single row on.

:class:`PaddedBatch` (the portable graph: any bundle, any device): every row keeps its own length
and positions too, but rows are right-aligned: a row's real tokens are the
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
from typing import Any

import numpy as np
import onnxruntime as ort

from gptedge.runtime import contract
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


class PaddedBatch:
    """The rows of the running batch (by key, in batch order) and their shared, right-aligned cache."""

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


class VariantBatch:
    """The running batch on ``model_ort.onnx``: row ``b`` holds its ``lengths[b]`` tokens in
    columns ``0 .. lengths[b]-1`` of buffers ``[B, kv_heads, capacity, head_dim]`` that the graph
    reads and appends to in place (past and present bound to the same memory)."""

    def __init__(self, backend: OrtBackend, max_context: int) -> None:
        assert backend.has_variant and backend.device == "cpu"
        self.backend = backend
        self.session = backend.session  # the variant (the backend opened it as its main session)
        self.max_context = max_context
        self.keys: list[Hashable] = []
        self.buffers: list[np.ndarray] = []
        self.lengths = np.zeros((0, 1), dtype=np.int64)
        self._binding: Any = None
        self._io: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ids, positions, logits: bound

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def state(self) -> object | None:
        """Something while rows run, None when the batch is empty (as :class:`PaddedBatch`)."""
        return self._binding

    def rebuild(self, keep: Sequence[Hashable], join: Sequence[Joiner], capacity: int = 0) -> None:
        """Make the batch ``keep`` (rows already in it) followed by ``join``, copying each row's
        tokens into new buffers of at least ``capacity`` columns."""
        index = {key: r for r, key in enumerate(self.keys)}
        sources = [(self.buffers, index[key], int(self.lengths[index[key], 0])) for key in keep]
        sources += [(kv_arrays(j.state), 0, j.length) for j in join]
        self.keys = [*keep, *(j.key for j in join)]
        self._binding, self._io = None, None
        if not self.keys:
            self.buffers, self.lengths = [], np.zeros((0, 1), dtype=np.int64)
            return
        longest = max(n for _, _, n in sources)
        # room to grow: doubling (as the backend's own buffers), at most the context
        capacity = min(self.max_context, max(capacity, 2 * longest, 64))
        layers = len(sources[0][0])
        buffers = []
        for layer in range(layers):
            sample = sources[0][0][layer]
            out = np.zeros((len(self.keys), sample.shape[1], capacity, sample.shape[3]), dtype=sample.dtype)
            for b, (arrays, r, n) in enumerate(sources):
                out[b, :, :n] = arrays[layer][r, :, :n]
            buffers.append(out)
        self.buffers = buffers
        self.lengths = np.asarray([n for _, _, n in sources], dtype=np.int64)[:, None]
        self._bind()

    def _bind(self) -> None:
        batch, capacity = len(self.keys), self.buffers[0].shape[2]
        binding = self.session.io_binding()
        for past, present, buffer in zip(self.backend.past_names, self.backend.present_names, self.buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the memory: updated in place
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        ids = np.zeros((batch, 1), dtype=np.int64)
        positions = np.zeros((batch, 1), dtype=np.int64)
        vocab = self.backend.bundle.manifest.architecture.vocab_size
        logits = np.empty((batch, 1, vocab), dtype=np.float32)
        binding.bind_cpu_input(contract.INPUT_IDS, ids)
        binding.bind_cpu_input(contract.POSITION_IDS, positions)
        # unread by the variant (its lengths come from the positions); bound for the contract's shape
        binding.bind_cpu_input(contract.ATTENTION_MASK, np.ones((batch, capacity), dtype=np.int64))
        if self.backend.one_logits_row:
            binding.bind_ortvalue_output(contract.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        else:
            binding.bind_output(contract.LOGITS, "cpu")
        self._binding, self._io = binding, (ids, positions, logits)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row (``tokens [B, 1]``); returns the logits ``[B, V]`` (valid until
        the next step)."""
        assert self._io is not None and tokens.shape == (len(self.keys), 1)
        if int(self.lengths.max()) + 1 > self.buffers[0].shape[2]:
            self.rebuild(list(self.keys), [], capacity=2 * self.buffers[0].shape[2])
        assert self._io is not None
        ids, positions, logits = self._io
        ids[:] = tokens
        positions[:] = self.lengths  # the new token's position = the row's length so far
        self.session.run_with_iobinding(self._binding)
        self.lengths += 1
        if self.backend.one_logits_row:
            return logits[:, 0, :]
        return self._binding.get_outputs()[0].numpy()[:, -1, :]
