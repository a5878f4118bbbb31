"""What a generation call returns, and the per-row bookkeeping that produces it (tokens, finish
reason, stable text, stop strings, timings)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from gptedge.runtime.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class GenerationResult:
    """One generated continuation.

    - ``text``: the generated text (without EOS; cut before a stop string).
    - ``tokens``: every generated id, including a final EOS or the tokens of a stop string.
    - ``finish_reason``: ``"length"`` (max_new_tokens reached), ``"eos"`` or ``"stop"``.
    - ``timings``: ``ttft_s`` (seconds to the first new token, prefill included),
      ``decode_tokens_per_s`` (tokens after the first, per second, for this row),
      ``prompt_tokens``, ``new_tokens``.
    """

    text: str
    tokens: list[int]
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)


class Row:
    """One sequence of a call. ``push`` records each sampled id; text is decoded incrementally only
    when it is needed before the end (streaming, stop strings)."""

    def __init__(self, prompt: Sequence[int], tokenizer: Tokenizer, eos_ids: frozenset[int],
                 ignore_eos: bool, stops: tuple[str, ...], track_text: bool) -> None:
        self.prompt_len = len(prompt)
        self.context = list(prompt[-IncrementalDecoder.CONTEXT:])
        self.tokenizer = tokenizer
        self.eos_ids = frozenset() if ignore_eos else eos_ids
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.decoder = IncrementalDecoder(tokenizer, self.context) if track_text or stops else None
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.text = ""  # stable decoded text so far (decoder mode)
        self.emitted = 0  # characters of ``text`` already handed to a stream
        self.t_first: float | None = None
        self.t_last: float | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def push(self, token: int) -> None:
        """Record one generated id; sets ``finish`` on EOS or a stop string."""
        now = time.perf_counter()
        self.t_first = self.t_first or now
        self.t_last = now
        self.tokens.append(token)
        if token in self.eos_ids:
            self._end("eos")
            return
        if self.decoder is not None:
            self._add_text(self.decoder.add(token))

    def _add_text(self, piece: str) -> None:
        if not piece:
            return
        before = len(self.text)
        self.text += piece
        if self.stops:
            start = max(0, before - self.holdback)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish = "stop"

    def end_of_budget(self) -> None:
        """max_new_tokens reached (or the loop ended) without EOS or stop."""
        if self.finish is None:
            self._end("length")

    def _end(self, reason: str) -> None:
        self.finish = reason
        if self.decoder is not None:
            self._add_text(self.decoder.flush())  # may still find a stop string (finish -> "stop")

    def stream_piece(self) -> str:
        """Text not yet handed out that can no longer change (a stop string may still cut the
        last ``holdback`` characters of an unfinished row)."""
        limit = len(self.text) if self.done else len(self.text) - self.holdback
        if limit <= self.emitted:
            return ""
        piece = self.text[self.emitted:limit]
        self.emitted = limit
        return piece

    def result(self, t_start: float) -> GenerationResult:
        if self.decoder is not None:
            text = self.text
        else:
            body = self.tokens[:-1] if self.finish == "eos" else self.tokens
            text = IncrementalDecoder.text_of(self.tokenizer, body, self.context)
        first = self.t_first or t_start
        last = self.t_last or first
        steps = len(self.tokens) - 1
        timings = {"ttft_s": first - t_start,
                   "decode_tokens_per_s": steps / (last - first) if steps > 0 and last > first else 0.0,
                   "prompt_tokens": self.prompt_len, "new_tokens": len(self.tokens)}
        return GenerationResult(text=text, tokens=list(self.tokens), finish_reason=self.finish or "length",
                                timings=timings)
