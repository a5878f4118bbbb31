"""The client-side generate loop for a Triton step model (``gptedge triton --kind onnx|tensorrt``).

Triton keeps each sequence's KV cache (implicit state); the client sends, per step, the new token
ids, the attention mask over everything in the cache and the positions, flags the first request
``sequence_start`` and the last ``sequence_end``, and samples from the returned logits with the
same code as :meth:`Generator.generate` — so a greedy run gives the same tokens. Every sequence
starts with one masked zero cache slot (see :mod:`gptedge.runtime.triton.config`), so it holds at
most ``max_context - 1`` tokens. Each sequence's requests go one after another; run several
sequences at once (threads, or several :meth:`StepClient.stream_ids` iterators) for Triton to batch.

The transport is a small protocol: :class:`GrpcTransport` talks to a server with ``tritonclient``
(``pip install 'gptedge[triton]'``, imported only when one is created); tests plug in an emulator.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gptedge.runtime import contract
from gptedge.runtime.bundle import Bundle, read_manifest
from gptedge.runtime.errors import BackendUnavailableError, GenerationError, GptEdgeError
from gptedge.runtime.generate import Generator, Prompt, Steps
from gptedge.runtime.results import GenerationResult, Row
from gptedge.runtime.sampling import SamplingOptions
from gptedge.runtime.triton.config import SINK_SLOTS

log = logging.getLogger(__name__)
TRITONCLIENT_HINT = "tritonclient is not installed; pip install 'gptedge[triton]'"


class StepTransport(Protocol):
    """Sends one step of sequence ``sequence_id`` (``inputs``: name -> int64 ``[1, n]``) and returns
    the model's ``logits`` (``[1, S or 1, vocab]``); ``start``/``end`` are Triton's sequence flags."""

    def infer(self, sequence_id: int, inputs: dict[str, np.ndarray], start: bool, end: bool) -> np.ndarray:
        ...


class GrpcTransport:
    """A :class:`StepTransport` over Triton's gRPC API (``url`` host:port, ``model`` its name)."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = "gptedge", timeout_s: float | None = 60.0) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ModuleNotFoundError as exc:
            raise BackendUnavailableError(TRITONCLIENT_HINT) from exc
        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.timeout_s = timeout_s

    def infer(self, sequence_id: int, inputs: dict[str, np.ndarray], start: bool, end: bool) -> np.ndarray:
        from tritonclient.utils import InferenceServerException

        tensors = []
        for name, array in inputs.items():
            tensor = self._grpc.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.int64))
            tensors.append(tensor)
        try:
            result = self.client.infer(self.model, tensors, outputs=[self._grpc.InferRequestedOutput(contract.LOGITS)],
                                       sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                                       client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise GenerationError(f"Triton model {self.model!r}: {exc.message()}") from exc
        return result.as_numpy(contract.LOGITS)

    def close(self) -> None:
        self.client.close()


class TritonSequence:
    """One sequence in Triton; duck-types :class:`~gptedge.runtime.kv_cache.KVSequence` ``feed`` so
    :meth:`Generator.decode` drives it. ``max_feeds``: requests the loop can send at most (prompt +
    ``max_new_tokens - 1`` decode steps): the last one is flagged ``sequence_end``."""

    def __init__(self, transport: StepTransport, max_context: int, max_feeds: int) -> None:
        self.transport = transport
        self.sequence_id = secrets.randbits(63) or 1  # Triton's correlation ids: unique, non-zero uint64
        self.max_context = max_context
        self.max_feeds = max_feeds
        self.length = 0
        self.feeds = 0
        self.ended = False

    def feed(self, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Send ``ids [1, S]``; return the last position's logits ``[1, V]``."""
        if mask is not None and not mask.all():
            raise GenerationError("a Triton sequence holds one row: padded prompts are not supported")
        if self.ended:
            raise GenerationError(f"Triton sequence {self.sequence_id} already ended")
        end = self.length + ids.shape[1]
        if end > self.max_context:
            raise GenerationError(f"{end} tokens do not fit in the step model's context of {self.max_context}; "
                                  "shorten the prompt or max_new_tokens")
        attention = np.ones((1, SINK_SLOTS + end), dtype=np.int64)
        attention[:, :SINK_SLOTS] = 0  # the zero slot the state starts with
        inputs = {contract.INPUT_IDS: np.asarray(ids, dtype=np.int64), contract.ATTENTION_MASK: attention,
                  contract.POSITION_IDS: np.arange(self.length, end, dtype=np.int64)[None]}
        self.feeds += 1
        last = self.feeds >= self.max_feeds
        logits = self.transport.infer(self.sequence_id, inputs, start=self.length == 0, end=last)
        self.ended = last
        self.length = end
        return np.asarray(logits)[:, -1, :]

    def close(self, last_token: int | None) -> None:
        """End the sequence in Triton (frees its state) when the loop stopped early (EOS, stop, an
        error): one more one-token request flagged ``sequence_end``."""
        if self.ended or self.length == 0:
            return
        token = np.asarray([[last_token if last_token is not None else 0]], dtype=np.int64)
        self.max_feeds = self.feeds + 1
        try:
            self.feed(token)
        except GptEdgeError as exc:  # the server drops it after max_sequence_idle_microseconds anyway
            log.warning("could not end Triton sequence %d: %s", self.sequence_id, exc)


class _NoEngine:
    """The client's Generator has no engine of its own: Triton runs the model."""

    name = "triton"

    def _remote(self, *args: Any, **kwargs: Any) -> Any:
        raise GenerationError("this Generator only samples; the model runs in Triton (use StepClient)")

    new_state = step = full_logits = _remote

    def close(self) -> None:
        pass


class StepClient:
    """Generates with a Triton step model. ``bundle_dir`` needs only ``manifest.json`` and the
    tokenizer files (the weights live on the server); ``max_context``: tokens the server's model
    holds (default: the bundle's; a TensorRT engine built with ``--max-context`` holds fewer)."""

    def __init__(self, bundle_dir: str | os.PathLike[str], transport: StepTransport,
                 max_context: int | None = None) -> None:
        path = Path(bundle_dir)
        self.generator = Generator(Bundle(path, read_manifest(path)), _NoEngine())
        self.generator.max_context = (max_context or self.generator.arch.max_context) - SINK_SLOTS
        self.transport = transport

    def _start(self, prompt: Prompt, options: SamplingOptions, track_text: bool) -> tuple[Steps, Row, TritonSequence]:
        gen = self.generator
        ids = gen.fit_to_context(gen.encode(prompt), options.max_new_tokens)
        row = Row(ids, gen.tokenizer, gen.eos_ids, options.ignore_eos, options.stop, track_text)
        sequence = TritonSequence(self.transport, gen.max_context, options.max_new_tokens)
        logits = sequence.feed(np.asarray([ids], dtype=np.int64))
        return gen.decode(sequence, logits, [row], options, [ids]), row, sequence

    def stream_ids(self, prompt: Prompt, options: SamplingOptions | None = None, **sampling: Any) -> Iterator[list[int]]:
        """The new token ids of each step (one request each) until the generation ends."""
        opts = SamplingOptions.of(options, **sampling)
        steps, row, sequence = self._start(prompt, opts, track_text=False)
        sent = 0
        try:
            for _ in steps:
                yield row.tokens[sent:]
                sent = len(row.tokens)
        finally:
            steps.close()
            sequence.close(row.tokens[-1] if row.tokens else None)

    def generate(self, prompt: Prompt, options: SamplingOptions | None = None, **sampling: Any) -> GenerationResult:
        """Like :meth:`Generator.generate` for one prompt (keywords: its sampling arguments)."""
        opts = SamplingOptions.of(options, **sampling)
        start = time.perf_counter()
        steps, row, sequence = self._start(prompt, opts, track_text=bool(opts.stop))
        try:
            for _ in steps:
                pass
        finally:
            steps.close()
            sequence.close(row.tokens[-1] if row.tokens else None)
        row.end_of_budget()
        return row.result(start)

    def chat(self, messages: Sequence[Mapping[str, Any]], **sampling: Any) -> GenerationResult:
        """The assistant's reply to ``messages``, rendered with the bundle's chat template (as
        :meth:`Generator.chat`)."""
        from gptedge.runtime.chat import chat_ids

        return self.generate(chat_ids(self.generator, messages), **sampling)
