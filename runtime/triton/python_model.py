"""The Triton python-backend model (``1/model.py`` of a ``gptedge triton --kind python`` repository).

Decoupled: one request (``text_input`` or ``input_ids``, plus optional ``max_tokens``,
``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``, ``ignore_eos``) answers with a stream of
responses, one per decode step that produced stable text, each holding ``text_output`` (the new
text), ``token_ids`` (the new ids) and ``finish_reason`` (empty until the last response: ``eos``,
``stop`` or ``length``). The request/stream logic is plain Python (:func:`request_options`,
:func:`stream_tokens`), so it is tested without Triton; only :class:`TritonPythonModel` touches
``triton_python_backend_utils``, which exists inside Triton's python stub only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from collections.abc import Generator as GeneratorOf
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptedge.runtime.errors import GptEdgeError, InputError
from gptedge.runtime.generate import Generator, Prompt, load
from gptedge.runtime.kv_cache import KVSequence
from gptedge.runtime.results import Row
from gptedge.runtime.sampling import SamplingOptions

log = logging.getLogger(__name__)
# request input -> (SamplingOptions field, converter)
_SCALARS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "max_tokens": ("max_new_tokens", int), "temperature": ("temperature", float), "top_k": ("top_k", int),
    "top_p": ("top_p", float), "seed": ("seed", int), "ignore_eos": ("ignore_eos", bool)}


@dataclass
class Chunk:
    """One streamed response: new ``token_ids``, new stable ``text``, ``finish_reason`` on the last."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def request_options(get: Callable[[str], np.ndarray | None]) -> tuple[Prompt, SamplingOptions]:
    """The prompt and sampling options of one request; ``get(name)`` returns an input tensor as
    numpy (None when the request does not carry it). InputError names a missing or bad input."""
    ids, text = get("input_ids"), get("text_input")
    if ids is not None and text is not None:
        raise InputError("send either text_input or input_ids, not both")
    if ids is not None:
        prompt: Prompt = [int(t) for t in np.asarray(ids).reshape(-1)]
    elif text is not None:
        prompt = _text(np.asarray(text, dtype=object).reshape(-1)[0])
    else:
        raise InputError("the request has no prompt: send text_input (string) or input_ids (int64)")
    kwargs: dict[str, Any] = {}
    for name, (option, convert) in _SCALARS.items():
        value = get(name)
        if value is not None:
            flat = np.asarray(value).reshape(-1)
            if flat.size != 1:
                raise InputError(f"input {name}: send one value, got {flat.size}")
            kwargs[option] = convert(flat[0].item())
    stop = get("stop")
    if stop is not None:
        kwargs["stop"] = tuple(_text(s) for s in np.asarray(stop, dtype=object).reshape(-1))
    return prompt, SamplingOptions(**kwargs)


def stream_tokens(generator: Generator, prompt: Prompt,
                  options: SamplingOptions) -> GeneratorOf[Chunk, None, None]:
    """Generate like :meth:`Generator.generate` (same tokens) and yield a :class:`Chunk` per step that
    produced stable text or tokens; the last chunk carries the finish reason. Closing the iterator
    ends the generation (its KV cache is freed)."""
    ids = generator.fit_to_context(generator.encode(prompt), options.max_new_tokens)
    row = Row(ids, generator.tokenizer, generator.eos_ids, options.ignore_eos, options.stop, track_text=True)
    sequence = KVSequence(generator.backend, 1, generator.max_context)
    logits = sequence.feed(np.asarray([ids], dtype=np.int64))
    steps = generator.decode(sequence, logits, [row], options, [ids])
    sent = 0
    try:
        for _ in steps:
            if row.done or len(row.tokens) == options.max_new_tokens:
                continue  # the loop ends after this step: the final chunk below carries these tokens
            piece = row.stream_piece()
            if piece or generator.tokenizer_info.kind == "none":
                yield Chunk(row.tokens[sent:], piece)
                sent = len(row.tokens)
    finally:
        steps.close()
    row.end_of_budget()
    yield Chunk(row.tokens[sent:], row.stream_piece(), row.finish)


class TritonPythonModel:
    """Triton's python-backend interface (``initialize``/``execute``/``finalize``). One Generator per
    instance (a process); requests of one ``execute`` call run one after another."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / params.get("gptedge_bundle", "bundle")
        threads = params.get("gptedge_threads")
        self.generator = load(bundle, backend=params.get("gptedge_backend", "auto"),
                              threads=int(threads) if threads else None)
        log.info("gptedge model %s: %s on %s", config.get("name"), bundle, self.generator.backend_name)

    def execute(self, requests: list[Any]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton's python stub

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._answer(pb_utils, request, sender, final)
            except GptEdgeError as exc:  # the client's mistake (bad input, prompt too long ...): say so
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=final)
            except Exception as exc:  # noqa: BLE001 - a bug: end this stream (never leave it open), log it
                log.exception("gptedge model: request failed")
                message = f"internal error {type(exc).__name__}: {exc} (a gptedge bug; see the server log)"
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=final)

    def _answer(self, pb_utils: Any, request: Any, sender: Any, final: int) -> None:
        def get(name: str) -> np.ndarray | None:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        prompt, options = request_options(get)
        chunks = stream_tokens(self.generator, prompt, options)
        try:
            for chunk in chunks:
                if getattr(request, "is_cancelled", lambda: False)():  # the client went away
                    sender.send(flags=final)
                    return
                outputs = [pb_utils.Tensor("text_output", np.array([chunk.text.encode("utf-8")], dtype=object)),
                           pb_utils.Tensor("token_ids", np.asarray(chunk.token_ids, dtype=np.int64)),
                           pb_utils.Tensor("finish_reason",
                                           np.array([(chunk.finish_reason or "").encode()], dtype=object))]
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs),
                            flags=final if chunk.finish_reason else 0)
        finally:
            chunks.close()

    def finalize(self) -> None:
        self.generator.close()
