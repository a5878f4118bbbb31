"""The generate loop: prefill + decode over any :class:`~gptedge.runtime.backend.Backend`.

The loop knows nothing about the engine: it feeds ids, gets the last logits row, picks tokens with
the pure functions of :mod:`gptedge.runtime.sampling` and keeps per-call state only, so one
:class:`Generator` may serve several threads at once.
"""

from __future__ import annotations

import collections.abc
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from gptedge.runtime.backend import Backend, create_backend
from gptedge.runtime.bundle import Bundle, load_bundle
from gptedge.runtime.errors import GenerationError
from gptedge.runtime.kv_cache import KVSequence, left_pad
from gptedge.runtime.results import GenerationResult, Row
from gptedge.runtime.sampling import SamplingOptions, check_finite, choose_token
from gptedge.runtime.tokenizer import load_tokenizer, with_bos

if TYPE_CHECKING:
    from gptedge.runtime.session import ChatSession

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]
# The decode loop: yields once per generated position; closing it ends the loop and frees its cache.
Steps = collections.abc.Generator[None, None, None]


def load(bundle_dir: str | os.PathLike[str], backend: str = "auto", threads: int | None = None) -> Generator:
    """Open a bundle folder and return a :class:`Generator` on ``backend`` (``"auto"``,
    ``"ort-cpu"``, ``"ort-cuda"`` or ``"tensorrt"``). ``threads``: CPU threads for onnxruntime
    (default: the physical cores). Raises BackendUnavailableError saying what to install."""
    bundle = load_bundle(bundle_dir)
    generator = Generator(bundle, create_backend(backend, bundle, threads))
    log.info("loaded %s on backend %s", bundle.path, generator.backend_name)
    return generator


class Generator:
    """Generates text from a bundle on one backend. Create it with :func:`load`."""

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        self.bundle = bundle
        self.backend = backend
        self.arch = bundle.manifest.architecture
        self.tokenizer = load_tokenizer(bundle)
        self.tokenizer_info = bundle.manifest.tokenizer
        self.max_context = self.arch.max_context
        self.eos_ids = frozenset(self.tokenizer_info.eos_ids)

    @property
    def backend_name(self) -> str:
        """Which backend runs this generator (``"ort-cpu"``, ``"ort-cuda"``, ``"tensorrt"``)."""
        return self.backend.name

    # -- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of one prompt: text is encoded (BOS prepended when the manifest says so);
        ids are used exactly as given."""
        if isinstance(prompt, str):
            return with_bos(self.tokenizer_info, self.tokenizer.encode(prompt))
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise GenerationError(f"prompt token ids {bad[:5]} are outside the model's vocabulary "
                                  f"0..{self.arch.vocab_size - 1}")
        return ids

    def _prompts(self, prompt: Prompt | Sequence[Prompt]) -> tuple[list[list[int]], bool]:
        """(token id lists, whether the caller passed a batch)."""
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            return [self.encode(prompt)], False
        items = list(prompt)
        if items and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
            return [self.encode(cast(list[int], items))], False
        if not items or not all(isinstance(p, (str, list, tuple, np.ndarray)) for p in items):
            raise GenerationError("prompt must be a string, a list of token ids, or a non-empty list of those")
        return [self.encode(cast(Prompt, p)) for p in items], True  # each checked just above

    def fit_to_context(self, ids: list[int], max_new_tokens: int, truncate_prompt: bool = False) -> list[int]:
        """The prompt ``ids`` to run, checked to leave room for ``max_new_tokens`` in the model's
        context; with ``truncate_prompt`` a prompt that is too long is cut to its rightmost tokens
        that fit. GenerationError (saying what to lower) when it cannot fit."""
        if not ids:
            raise GenerationError("the prompt is empty; pass at least one token (or text)")
        room = self.max_context - max_new_tokens
        if len(ids) <= room:
            return ids
        if truncate_prompt and room >= 1:
            return ids[-room:]
        if room < 1:  # truncating cannot help: the new tokens alone fill the context
            raise GenerationError(
                f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of "
                f"{self.max_context} tokens, and max_new_tokens alone leaves no room for a prompt; lower "
                f"max_new_tokens below {self.max_context}")
        raise GenerationError(
            f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{self.max_context} tokens; lower max_new_tokens or pass truncate_prompt=True "
            f"(keeps the last {room} prompt tokens)")

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                 truncate_prompt: bool = False,
                 options: SamplingOptions | None = None) -> GenerationResult | list[GenerationResult]:
        """Generate a continuation of ``prompt`` (text, token ids, or a list of those = a batch,
        left-padded). ``temperature`` 0 is greedy; the sampling arguments are those of
        :class:`~gptedge.runtime.sampling.SamplingOptions`, given as keywords or all at once as
        ``options``. Returns one :class:`GenerationResult`, or a list for a batch."""
        opts = SamplingOptions.of(options, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                                  ignore_eos=ignore_eos)
        prompts, is_batch = self._prompts(prompt)
        prompts = [self.fit_to_context(p, opts.max_new_tokens, truncate_prompt) for p in prompts]
        rows = [self._row(p, opts, track_text=False) for p in prompts]
        start = time.perf_counter()
        for _ in self._run(prompts, rows, opts):
            pass
        results = []
        for row in rows:
            row.end_of_budget()
            results.append(row.result(start))
        return results if is_batch else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
               truncate_prompt: bool = False, options: SamplingOptions | None = None) -> TextStream:
        """Like :meth:`generate` for ONE prompt: an iterator of text pieces as they become stable
        (never half a UTF-8 character; never text a stop string could still cut). Closing it stops
        the generation; once exhausted, its ``result`` is the :class:`GenerationResult`."""
        opts = SamplingOptions.of(options, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                                  ignore_eos=ignore_eos)
        prompts, is_batch = self._prompts(prompt)
        if is_batch:
            raise GenerationError("stream() takes one prompt; use generate() for a batch")
        prompts = [self.fit_to_context(prompts[0], opts.max_new_tokens, truncate_prompt)]
        row = self._row(prompts[0], opts, track_text=True)
        return TextStream(self._run(prompts, [row], opts), row)

    def _row(self, prompt: list[int], options: SamplingOptions, track_text: bool) -> Row:
        return Row(prompt, self.tokenizer, self.eos_ids, options.ignore_eos, options.stop, track_text)

    def _run(self, prompts: list[list[int]], rows: list[Row], options: SamplingOptions) -> Steps:
        """Prefill the left-padded batch, then decode; yields once per generated position."""
        pad = self.tokenizer_info.pad_id if self.tokenizer_info.pad_id is not None else 0
        ids, mask = left_pad(prompts, pad)
        sequence = KVSequence(self.backend, len(prompts), self.max_context)
        logits = sequence.feed(ids, mask)
        yield from self.decode(sequence, logits, rows, options, prompts)

    def decode(self, sequence: KVSequence, logits: np.ndarray, rows: list[Row], options: SamplingOptions,
               history: list[list[int]]) -> Steps:
        """Sample from ``logits [B, V]``, feed the tokens back, repeat up to ``options.max_new_tokens``
        times. Finished rows keep stepping (their outputs are ignored). The last sampled token is
        not fed (its KV is not in the cache). ``history`` (ids so far) feeds the repetition penalty."""
        rng = options.rng()
        seen = None
        if options.repetition_penalty is not None:
            seen = np.zeros((len(rows), logits.shape[-1]), dtype=bool)
            for r, ids in enumerate(history):
                seen[r, [i for i in ids if i < logits.shape[-1]]] = True
        next_ids = np.zeros((len(rows), 1), dtype=np.int64)
        for step in range(options.max_new_tokens):
            for r, row in enumerate(rows):
                if row.done:
                    continue
                token = choose_token(logits[r], options, rng, None if seen is None else seen[r])
                row.push(token)
                next_ids[r, 0] = token
                if seen is not None:
                    seen[r, token] = True
            yield
            if step + 1 == options.max_new_tokens or all(row.done for row in rows):
                return
            logits = sequence.feed(next_ids)

    # -- chat -----------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]], **sampling: Any) -> GenerationResult:
        """The assistant's reply to ``messages`` (``[{"role": ..., "content": ...}, ...]``), rendered
        with the bundle's chat template; ``sampling``: the keyword arguments of :meth:`generate`."""
        from gptedge.runtime.chat import chat_ids

        return self.generate(chat_ids(self, messages), **sampling)

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], **sampling: Any) -> TextStream:
        """Like :meth:`chat`, streamed as :meth:`stream` does."""
        from gptedge.runtime.chat import chat_ids

        return self.stream(chat_ids(self, messages), **sampling)

    # -- scoring and sessions -------------------------------------------------------------------
    def score(self, prompt: Prompt) -> np.ndarray:
        """Log-probability (natural log) of each token given its prefix: float32 ``[n_tokens - 1]``,
        from the full-logits graph ``model.onnx`` (loaded on first use)."""
        ids, is_batch = self._prompts(prompt)
        if is_batch:
            raise GenerationError("score() takes one prompt")
        tokens = ids[0]
        if len(tokens) < 2:
            raise GenerationError("score() needs at least 2 tokens (the first has no prefix to condition on)")
        if len(tokens) > self.max_context:
            raise GenerationError(f"score(): {len(tokens)} tokens exceed the model's context of "
                                  f"{self.max_context}; score a shorter text")
        arr = np.asarray([tokens], dtype=np.int64)
        logits = self.backend.full_logits(arr, np.ones_like(arr), np.arange(len(tokens), dtype=np.int64)[None])[0]
        check_finite(logits)
        logits = logits[:-1].astype(np.float32, copy=False)
        top = logits.max(axis=-1, keepdims=True)
        logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
        picked = logits[np.arange(len(tokens) - 1), tokens[1:]]
        return (picked - logsumexp).astype(np.float32)

    def session(self, system: str | None = None) -> ChatSession:
        """A :class:`~gptedge.runtime.session.ChatSession` keeping the KV cache between calls;
        ``system``: the system message its :meth:`~ChatSession.chat` turns start with."""
        from gptedge.runtime.session import ChatSession

        return ChatSession(self, system)

    def close(self) -> None:
        """Release the engine; any later call raises a GenerationError instead of failing inside it."""
        self.backend.close()
        self.backend = _ClosedBackend(self.backend.name)

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ClosedBackend:
    """Stands in for the engine of a closed :class:`Generator`: every use says so in one line."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _closed(self, *args: Any, **kwargs: Any) -> Any:
        raise GenerationError(f"this Generator ({self.name}) was closed; open the bundle again with "
                              "gptedge.runtime.load(...)")

    new_state = step = full_logits = _closed

    def close(self) -> None:
        pass  # closing twice is harmless


class TextStream:
    """Iterator of text pieces from :meth:`Generator.stream`; ``result`` once it is exhausted."""

    def __init__(self, steps: Steps, row: Row) -> None:
        self._start = time.perf_counter()
        self._steps = steps
        self._row = row
        self._pieces = self._generate()
        self.result: GenerationResult | None = None

    def _generate(self) -> collections.abc.Generator[str, None, None]:
        try:
            for _ in self._steps:
                piece = self._row.stream_piece()
                if piece:
                    yield piece
            self._row.end_of_budget()
            self.result = self._row.result(self._start)
            piece = self._row.stream_piece()
            if piece:
                yield piece
        finally:
            self._steps.close()  # an early close ends the decode loop and frees its cache

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (the KV cache of this call is released)."""
        self._pieces.close()
