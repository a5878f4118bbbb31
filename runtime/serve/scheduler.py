"""Continuous batching: one thread owns the model and advances every running request one token per
step; requests join and leave at step boundaries (see :mod:`gptedge.runtime.serve.batch_cache`).

A step boundary (:meth:`Scheduler.step`): rows that finished or were cancelled leave; queued
requests are prefilled alone and join while the batch has room; the batch runs one decode step and
each row picks its token with the same pure sampling function, and its own random generator, as
:meth:`~gptedge.runtime.generate.Generator.generate` -- which is why batching never changes a result.
Results go back through each job's ``sink`` (called on the scheduler thread; the web app hands them
to its event loop). An exception while serving one request fails that request, never the thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gptedge.runtime.errors import BackendUnavailableError, GenerationError, GptEdgeError
from gptedge.runtime.ort.backend import OrtBackend
from gptedge.runtime.results import Row
from gptedge.runtime.sampling import SamplingOptions, choose_token
from gptedge.runtime.serve.batch_cache import Joiner, PaddedBatch, VariantBatch, prefill
from gptedge.runtime.tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:
    from gptedge.runtime.generate import Generator
    from gptedge.runtime.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFullError(GptEdgeError):
    """The wait queue is full: the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(GptEdgeError):
    """The server is stopping and takes no new requests."""


@dataclass
class TokenLogprob:
    """A generated token's text and log-probability (natural log, from the model's raw
    distribution) and the ``top`` most likely alternatives as ``(text, logprob)``."""

    token: int
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Update:
    """What one step produced for one request: stable ``text`` not sent before, the new ``tokens``
    and their ``logprobs`` (when asked for); on the last update ``finish_reason`` (``"stop"``: EOS or
    a stop string, ``"length"``: max tokens) and the token counts; ``error`` when the request failed."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Job:
    """One request as the scheduler sees it: prompt ``ids`` (checked to fit the context with
    ``options.max_new_tokens``), sampling ``options``, ``logprobs`` (top alternatives to report per
    token; None: no logprobs) and the ``sink`` that receives its :class:`Update` objects."""

    def __init__(self, ids: Sequence[int], options: SamplingOptions, sink: Callable[[Update], None],
                 logprobs: int | None = None) -> None:
        self.ids = list(ids)
        self.options = options
        self.sink = sink
        self.logprobs = logprobs
        self.cancelled = False  # set by any thread; the scheduler drops the row at the next boundary
        self.row: Row | None = None
        self.rng = options.rng()
        self.submitted = time.perf_counter()
        self.last_token_at: float | None = None

    def cancel(self) -> None:
        """Stop generating for this job (its row leaves the batch at the next step boundary)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.row is not None and self.row.done


def batching_caveat(precision: dict[str, Any], ragged: bool) -> str | None:
    """Why batched greedy outputs of a bundle of this ``precision`` may differ from its
    single-request ones (None: they do not, measured: benchmarks/serve_identity.py)."""
    if precision.get("activations") != "int8-dynamic" and precision.get("accuracy_level") != 4:
        return None
    if "weight_block_size" not in precision:  # onnxruntime's quantize_dynamic: one scale per tensor
        return ("its activations are quantized with one scale for the whole batch, so a row's tokens depend on "
                "the other rows; re-quantize with the default int8-dynamic kernel (MatMulNBits) to serve it")
    if not ragged:
        return ("on the padded portable batch, the padded attention's ~1e-8 rounding differences are amplified by "
                "the int8 activation quantization: batched greedy outputs may differ from single-request ones; "
                "the per-row-length batch (CPU, model_ort.onnx, no --portable-batch) is exact")
    return None


class Scheduler:
    """Owns ``generator``'s model on one thread; at most ``max_batch`` rows run, at most
    ``max_queue`` requests wait (more answer :class:`QueueFullError`). The batch decodes on the
    bundle's onnxruntime variant with per-row lengths where it can (CPU, ``model_ort.onnx``
    present), else on the portable graph with padding; ``portable_batch`` forces the latter."""

    def __init__(self, generator: Generator, max_batch: int = 8, max_queue: int = 64,
                 metrics: Metrics | None = None, portable_batch: bool = False) -> None:
        if not isinstance(generator.backend, OrtBackend):
            raise BackendUnavailableError(f"the server batches on onnxruntime; backend {generator.backend_name!r} "
                                          "cannot be batched here: use --backend ort-cpu or ort-cuda")
        if max_batch < 1 or max_queue < 0:
            raise GenerationError(f"max_batch={max_batch}, max_queue={max_queue}: need max_batch >= 1, max_queue >= 0")
        self.generator = generator
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        backend = generator.backend
        ragged = backend.has_variant and backend.device == "cpu" and not portable_batch
        self.batch: PaddedBatch | VariantBatch = (VariantBatch if ragged else PaddedBatch)(backend,
                                                                                           generator.max_context)
        warning = batching_caveat(generator.bundle.manifest.precision, ragged)
        if warning:
            log.warning("%s: %s", generator.bundle.path, warning)
        self.steps = 0  # decode steps run so far
        self._pending: collections.deque[Job] = collections.deque()
        self._last: dict[Job, int] = {}  # each running job's last sampled token (not yet in the cache)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the web side ---------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; QueueFullError when the batch is full and ``max_queue`` requests already
        wait (``max_queue`` 0: no waiting, only free rows take requests)."""
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down; send the request to another replica")
            # requests that will wait: those beyond the batch's free rows (admitted at the next boundary)
            if len(self._pending) - max(self.max_batch - len(self._last), 0) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting, --max-queue); "
                                     "retry later", retry_after=self._retry_after())
            self._pending.append(job)
            self._cond.notify()
        self._gauges()

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: about one request's share of the work ahead."""
        return 1 + len(self._pending) // max(self.max_batch, 1)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        """Rows in the batch (a row that finished this step counts until the next boundary)."""
        return len(self.batch)

    def start(self) -> None:
        """Run the scheduler thread."""
        self._thread = threading.Thread(target=self._loop, name="gptedge-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new requests, let the running and queued ones finish for up to ``timeout``
        seconds, then cancel what is left and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("cancelling %d requests still running after %.0f s", self.running + self.queue_depth, timeout)
            with self._cond:
                for job in [*self._pending, *self._last]:
                    job.cancel()
            self._thread.join(timeout)

    # -- the scheduler thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._last or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._pending and not self._last:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug must not kill the thread that serves everyone
                log.exception("scheduler step failed; failing the running requests")
                self._fail_all("internal error in the scheduler (see the server log)")

    def step(self) -> None:
        """One boundary and one decode step (see the module doc). Public so that tests can drive
        the batch step by step without the thread."""
        leaving = [job for job in self._last if job.cancelled or job.done]
        for job in leaving:
            del self._last[job]
            if not job.done and self.metrics is not None:
                self.metrics.cancel()
        joiners = self._admit(self.max_batch - len(self._last))
        if leaving or joiners:
            self.batch.rebuild([job for job in self.batch.keys if job in self._last], joiners)
        self._gauges()
        if not len(self.batch):
            return
        tokens = np.asarray([[self._last[job]] for job in self.batch.keys], dtype=np.int64)
        try:
            logits = self.batch.step(tokens)
        except GptEdgeError as exc:
            self._fail_all(str(exc))
            return
        self.steps += 1
        for r, job in enumerate(self.batch.keys):
            self._advance(job, logits[r])  # type: ignore[arg-type]  # keys are the jobs

    def _admit(self, room: int) -> list[Joiner]:
        """Prefill queued jobs (alone) while the batch has ``room``; those not finished by their
        first token join."""
        joiners = []
        while room > 0:
            with self._cond:
                if not self._pending:
                    break
                job = self._pending.popleft()
            if job.cancelled:
                if self.metrics is not None:
                    self.metrics.cancel()
                continue
            gen = self.generator
            job.row = Row(job.ids, gen.tokenizer, gen.eos_ids, job.options.ignore_eos, job.options.stop, True)
            try:
                state, logits = prefill(self.generator.backend, job.ids)
                if self.metrics is not None:
                    self.metrics.prompt_tokens(len(job.ids))
                self._advance(job, logits)
            except GptEdgeError as exc:
                self._emit(job, Update(error=str(exc)))
                continue
            except Exception:  # noqa: BLE001 - one request's prefill failing must not fail the batch
                log.exception("prefill of a %d-token prompt failed", len(job.ids))
                self._emit(job, Update(error="internal error while reading the prompt (see the server log)"))
                continue
            if not job.done:
                self._last[job] = job.row.tokens[-1]
                joiners.append(Joiner(job, state, len(job.ids)))
                room -= 1
        return joiners

    def _advance(self, job: Job, logits: np.ndarray) -> None:
        """Pick ``job``'s next token from its logits row ``[V]`` and send the update."""
        row = job.row
        assert row is not None and not row.done
        try:
            token = choose_token(logits, job.options, job.rng)
        except GenerationError as exc:  # non-finite logits: this request fails, the batch goes on
            row.finish = "error"
            self._emit(job, Update(error=str(exc)))
            return
        update = Update(tokens=[token])
        if job.logprobs is not None:
            context = (job.ids + row.tokens)[-IncrementalDecoder.CONTEXT:]
            update.logprobs.append(token_logprob(logits, token, job.logprobs, self.generator.tokenizer, context))
        row.push(token)
        self._last[job] = token
        if len(row.tokens) >= job.options.max_new_tokens:
            row.end_of_budget()
        update.text = row.stream_piece()
        if row.done:
            update.finish_reason = "length" if row.finish == "length" else "stop"
            update.prompt_tokens, update.completion_tokens = len(job.ids), len(row.tokens)
        self._timing(job)
        self._emit(job, update)

    def _timing(self, job: Job) -> None:
        now = time.perf_counter()
        if self.metrics is not None:
            if job.last_token_at is None:
                self.metrics.first_token(now - job.submitted)
            else:
                self.metrics.next_token(now - job.last_token_at)
        job.last_token_at = now

    def _emit(self, job: Job, update: Update) -> None:
        try:
            job.sink(update)
        except Exception:  # noqa: BLE001 - a sink that fails (its client is gone) cancels its job only
            log.debug("sink of a job failed; cancelling it", exc_info=True)
            job.cancel()

    def _fail_all(self, message: str) -> None:
        """Fail every running request with ``message`` and empty the batch."""
        for job in list(self._last):
            if not job.done:
                self._emit(job, Update(error=message))
        self._last.clear()
        self.batch.rebuild([], [])

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.gauges(queue=len(self._pending), running=len(self._last))


def token_logprob(logits: np.ndarray, token: int, top: int, tokenizer: Tokenizer,
                  context: Sequence[int]) -> TokenLogprob:
    """``token``'s log-probability under softmax(``logits [V]``) and the ``top`` most likely tokens,
    each with its text as it reads after ``context`` (the ids before it: spaces depend on them)."""
    z = logits.astype(np.float64)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    best: list[Any] = np.argsort(-logp, kind="stable")[:top].tolist() if top > 0 else []
    before = tokenizer.decode(list(context))

    def text(t: int) -> str:
        after = tokenizer.decode([*context, t])
        return after[len(before):] if after.startswith(before) else tokenizer.decode([t])

    return TokenLogprob(token=token, text=text(token), logprob=float(logp[token]),
                        top=[(text(int(t)), float(logp[t])) for t in best])
