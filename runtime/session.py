"""A conversation that keeps its KV cache between calls: each turn runs only the new tokens."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gptedge.runtime.errors import GenerationError
from gptedge.runtime.kv_cache import KVSequence
from gptedge.runtime.results import GenerationResult
from gptedge.runtime.sampling import SamplingOptions
from gptedge.runtime.tokenizer import with_bos

if TYPE_CHECKING:
    from gptedge.runtime.generate import Generator, Prompt


class ChatSession:
    """Append text or ids, generate, append more, generate again ... without re-running earlier
    turns. Generated tokens (EOS and stop-string tokens included) stay in the context.

    Not thread-safe: one session belongs to one caller (a Generator can hold many sessions).
    """

    def __init__(self, generator: Generator, system: str | None = None) -> None:
        self.generator = generator
        # the chat turns of :meth:`chat` (a system prompt first when given)
        self.messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        self.reused_tokens = 0  # tokens of the last chat() prompt already in the cache
        self.ids: list[int] = []  # every token of the conversation, in order
        self._pending: list[int] = []  # tokens in ``ids`` not yet run through the model
        self._sequence: KVSequence | None = None

    @property
    def remaining(self) -> int:
        """Tokens that still fit in the model's context."""
        return self.generator.max_context - len(self.ids)

    def append(self, prompt: Prompt) -> list[int]:
        """Add text (encoded; BOS first when the session is empty and the manifest asks for it)
        or token ids (as given). Returns the ids added. They are run at the next :meth:`generate`."""
        if isinstance(prompt, str):
            ids = self.generator.tokenizer.encode(prompt)
            if not self.ids:  # only the text that opens the conversation may start with BOS
                ids = with_bos(self.generator.tokenizer_info, ids)
        else:
            ids = self.generator.encode(prompt)
        if len(ids) > self.remaining:
            raise GenerationError(f"appending {len(ids)} tokens to a session holding {len(self.ids)} exceeds the "
                                  f"model's context of {self.generator.max_context} tokens; start a new session")
        self.ids.extend(ids)
        self._pending.extend(ids)
        return ids

    def generate(self, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False, options: SamplingOptions | None = None) -> GenerationResult:
        """Continue the conversation (arguments as :meth:`Generator.generate`)."""
        gen = self.generator
        opts = SamplingOptions.of(options, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                                  ignore_eos=ignore_eos)
        if not self._pending:
            raise GenerationError("nothing to continue from: append() a prompt first")
        if len(self.ids) + opts.max_new_tokens > gen.max_context:
            raise GenerationError(
                f"session holds {len(self.ids)} tokens; + max_new_tokens={opts.max_new_tokens} exceeds the "
                f"model's context of {gen.max_context} tokens; lower max_new_tokens (at most "
                f"{max(self.remaining, 0)}) or start a new session")
        if self._sequence is None:
            self._sequence = KVSequence(gen.backend, 1, gen.max_context)
        row = gen._row(self.ids, opts, track_text=False)
        start = time.perf_counter()
        logits = self._sequence.feed(np.asarray([self._pending], dtype=np.int64))
        self._pending = []
        for _ in gen.decode(self._sequence, logits, [row], opts, [self.ids]):
            pass
        row.end_of_budget()
        self.ids.extend(row.tokens)
        # The last sampled token has not been run through the model yet: it opens the next turn.
        self._pending = row.tokens[-1:]
        result = row.result(start)
        result.timings["prompt_tokens"] = len(self.ids) - len(row.tokens)
        return result

    def chat(self, message: str | Mapping[str, Any], **sampling: Any) -> GenerationResult:
        """Add a user message (text, or a ``{"role", "content"}`` dict) and return the assistant's
        reply; ``sampling`` as :meth:`generate`. Only the tokens the chat template adds after the
        cached conversation are run; if re-rendering changes earlier tokens (a template that
        rewrites history, or a reply that re-encodes differently) the prompt is run afresh."""
        from gptedge.runtime.chat import chat_ids

        turn = {"role": "user", "content": message} if isinstance(message, str) else dict(message)
        ids = chat_ids(self.generator, [*self.messages, turn])
        reused = len(self.ids) if ids[:len(self.ids)] == self.ids and len(ids) > len(self.ids) else 0
        if not reused:
            self.ids, self._pending, self._sequence = [], [], None
        self.append(ids[reused:])
        self.reused_tokens = reused
        result = self.generate(**sampling)
        self.messages += [turn, {"role": "assistant", "content": result.text}]
        return result

    def reset(self) -> None:
        """Forget the conversation (the cache is freed; a system message stays)."""
        self.ids, self._pending, self._sequence = [], [], None
        self.messages = [m for m in self.messages if m.get("role") == "system"]
