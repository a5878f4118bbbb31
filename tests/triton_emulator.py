"""Triton's sequence batcher with implicit state, replayed on onnxruntime for a step model of a
repository written by `gptedge triton --kind onnx`, driven by its own config.pbtxt:

- a request's inputs must be exactly the config's ``input`` list (batch dim first, dims, INT64);
- ``sequence_start`` gives the sequence a fresh state from each ``initial_state`` (zero data,
  the batch dim added); any other request of an unknown sequence is an error, as in Triton;
- the model's ``state[i].output_name`` of request k is fed as ``state[i].input_name`` of request
  k + 1 of the same sequence; ``sequence_end`` frees the state;
- one execution may hold requests of several sequences (the Oldest strategy's dynamic batch):
  never two of one sequence, at most ``max_batch_size``, and only with equal input shapes.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

NUMPY = {mc.TYPE_FP32: np.float32, mc.TYPE_FP16: np.float16, mc.TYPE_INT64: np.int64}
Request = tuple[int, dict[str, np.ndarray], bool, bool]  # sequence id, inputs, start, end


def parse_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(encoding="utf-8"), mc.ModelConfig())


class SequenceBatcherEmulator:
    """One model instance of a step model under the sequence batcher (see the module doc)."""

    def __init__(self, model_dir: Path) -> None:
        self.config = parse_config(model_dir / "config.pbtxt")
        assert self.config.platform == "onnxruntime_onnx"
        graph = model_dir / "1" / self.config.default_model_filename
        self.session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        self.states: dict[int, dict[str, np.ndarray]] = {}
        self.executions: list[int] = []  # batch size of each execution

    def _check(self, inputs: dict[str, np.ndarray]) -> None:
        expected = {i.name: i for i in self.config.input}
        assert set(inputs) == set(expected), f"request inputs {sorted(inputs)} != config {sorted(expected)}"
        for name, array in inputs.items():
            spec = expected[name]
            assert array.dtype == NUMPY[spec.data_type], (name, array.dtype)
            assert array.ndim == len(spec.dims) + 1 and array.shape[0] == 1, (name, array.shape)
            assert all(d == -1 or d == s for d, s in zip(spec.dims, array.shape[1:])), (name, array.shape)

    def _initial(self) -> dict[str, np.ndarray]:
        out = {}
        for state in self.config.sequence_batching.state:
            (init,) = state.initial_state  # repeated in the schema; one given
            assert init.zero_data and init.data_type == state.data_type
            out[state.input_name] = np.zeros([1, *init.dims], dtype=NUMPY[init.data_type])
        return out

    def infer(self, sequence_id: int, inputs: dict[str, np.ndarray], start: bool, end: bool) -> np.ndarray:
        return self.execute([(sequence_id, inputs, start, end)])[0]

    def execute(self, requests: list[Request]) -> list[np.ndarray]:
        """One model execution over ``requests`` (their state inputs concatenated on the batch dim)."""
        assert 1 <= len(requests) <= self.config.max_batch_size
        assert len({r[0] for r in requests}) == len(requests), "two requests of one sequence in a batch"
        shapes = {tuple((n, a.shape) for n, a in sorted(r[1].items())) for r in requests}
        assert len(shapes) == 1, "Triton batches only requests with equal input shapes"
        for sequence_id, inputs, start, _end in requests:
            self._check(inputs)
            if start:
                self.states[sequence_id] = self._initial()
            assert sequence_id in self.states, f"sequence {sequence_id} was never started (or already ended)"
        names = [i.name for i in self.config.input]
        feed = {n: np.concatenate([r[1][n] for r in requests]) for n in names}
        for state in self.config.sequence_batching.state:
            feed[state.input_name] = np.concatenate([self.states[r[0]][state.input_name] for r in requests])
        wanted = ["logits"] + [s.output_name for s in self.config.sequence_batching.state]
        outputs = dict(zip(wanted, self.session.run(wanted, feed)))
        self.executions.append(len(requests))
        results = []
        for row, (sequence_id, _inputs, _start, end) in enumerate(requests):
            if end:
                del self.states[sequence_id]
            else:
                self.states[sequence_id] = {s.input_name: outputs[s.output_name][row:row + 1]
                                            for s in self.config.sequence_batching.state}
            results.append(outputs["logits"][row:row + 1])
        return results


class BatchingTransport:
    """A transport that holds each request until ``batch`` requests are waiting (or ``wait_s``
    passes), then runs them as one execution: concurrent clients get batched like under Triton."""

    def __init__(self, emulator: SequenceBatcherEmulator, batch: int, wait_s: float = 2.0) -> None:
        self.emulator, self.batch, self.wait_s = emulator, batch, wait_s
        self.cond = threading.Condition()
        self.pending: list[Request] = []
        self.results: dict[int, np.ndarray] = {}

    def infer(self, sequence_id: int, inputs: dict[str, np.ndarray], start: bool, end: bool) -> np.ndarray:
        with self.cond:
            self.pending.append((sequence_id, inputs, start, end))
            self.cond.notify_all()
            self.cond.wait_for(lambda: sequence_id in self.results or len(self.pending) >= self.batch,
                               timeout=self.wait_s)
            if sequence_id not in self.results:  # this thread runs the batch (full, or waited long enough)
                group, self.pending = self.pending, []
                for (sid, *_), logits in zip(group, self.emulator.execute(group)):
                    self.results[sid] = logits
                self.cond.notify_all()
            return self.results.pop(sequence_id)
