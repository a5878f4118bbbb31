"""The OpenAI wire format the server speaks: request models (pydantic validates every field and
names the bad one) and the JSON bodies of responses and stream chunks.

Fields of OpenAI's API that do not change the output (``user``, ``metadata`` ...) are accepted and
ignored, as other OpenAI-compatible servers do; ``n`` must be 1, and ``presence_penalty``,
``frequency_penalty`` and ``logit_bias`` are accepted only at their neutral values.
``ignore_eos`` is an extension (as in vLLM): keep generating past EOS, for load tests.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gptedge.runtime.serve.scheduler import TokenLogprob, Update

MAX_STOPS = 4  # OpenAI's limit


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request (send more requests for more)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # accepted so that clients which always send them work; a value that would change the output
    # is refused rather than silently ignored
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported: empty only")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or not all(stops):
            raise ValueError(f"stop must be at most {MAX_STOPS} non-empty strings")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is text or token ids; ``logprobs``: how many alternatives
    to report per token (0..5; 0 = the chosen token's only)."""

    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (send one request per prompt)")
            prompt = str(prompt[0])
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (``developer`` is OpenAI's new ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (the ``openai`` client reads ``error.message``)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def logprobs_body(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions ``logprobs`` object for ``items``; ``offset``: characters of text before them."""
    tokens = [item.text for item in items]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [item.logprob for item in items],
            "top_logprobs": [dict(item.top) for item in items],
            "text_offset": offsets}


class Envelope:
    """The id, creation time and model name every body of one response carries."""

    def __init__(self, kind: Literal["text_completion", "chat.completion"], model: str) -> None:
        self.kind = kind
        self.id = new_id("cmpl" if kind == "text_completion" else "chatcmpl")
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish: str | None, logprobs: dict[str, Any] | None = None,
              role: bool = False) -> dict[str, Any]:
        """One stream chunk (chat: a ``delta``; ``role``: the first chunk, naming the assistant)."""
        if self.kind == "text_completion":
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
            return {**self._head("text_completion"), "choices": [choice]}
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, last: Update) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"
        return {**self._head(obj), "choices": [], "usage": usage(last.prompt_tokens, last.completion_tokens)}

    def whole(self, text: str, last: Update, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The body of a response that is not streamed."""
        if self.kind == "text_completion":
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": logprobs,
                                      "finish_reason": last.finish_reason}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": last.finish_reason}
        return {**self._head(self.kind), "choices": [choice],
                "usage": usage(last.prompt_tokens, last.completion_tokens)}
