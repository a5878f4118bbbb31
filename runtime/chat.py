"""Chat templates: render a bundle's Jinja chat template (sandboxed, as transformers does) and turn
a list of messages into prompt ids for :class:`~gptedge.runtime.generate.Generator`.

A message is ``{"role": "system" | "user" | "assistant", "content": str}``. The template decides
every special token (BOS included), so templated prompts are never given an extra BOS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from gptedge.runtime.bundle import Bundle
from gptedge.runtime.errors import BundleError, GenerationError

if TYPE_CHECKING:
    import jinja2

    from gptedge.runtime.generate import Generator

Message = Mapping[str, Any]


class _TemplateRaised(Exception):
    """What the template's ``raise_exception(message)`` raises (turned into a GenerationError)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile ``source`` in an immutable sandbox: templates cannot reach Python internals or
    mutate the messages. Whitespace handling matches transformers (trim_blocks, lstrip_blocks)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise BundleError(f"chat template: Jinja syntax error line {exc.lineno}: {exc.message}; "
                          "fix chat_template.jinja in the bundle") from exc


def template_source(bundle: Bundle) -> str:
    """The bundle's chat template text; BundleError when it has none."""
    name = bundle.manifest.tokenizer.chat_template
    path = bundle.path / name if name else None
    if path is None or not path.is_file():
        raise BundleError(f"{bundle.path}: this bundle has no chat template; re-export it from a folder whose "
                          "tokenizer_config.json has 'chat_template' (or use `gptedge generate` with plain text)")
    return path.read_text(encoding="utf-8")


def _check_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or "content" not in message:
            raise GenerationError(f"messages[{i}]={message!r}: needs a 'role' string and a 'content'")
        checked.append(dict(message))
    return checked


def render_chat(bundle: Bundle, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The prompt text the bundle's chat template makes of ``messages``; with
    ``add_generation_prompt`` it ends with the opening of an assistant turn."""
    import jinja2

    info = bundle.manifest.tokenizer
    template = compile_template(template_source(bundle))
    try:
        return template.render(messages=_check_messages(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=info.bos_token or "", eos_token=info.eos_token or "")
    except _TemplateRaised as exc:
        raise GenerationError(f"chat template refused the messages: {exc}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise GenerationError(f"chat template tried an unsafe operation ({exc}); fix chat_template.jinja") from exc
    except jinja2.TemplateError as exc:
        raise GenerationError(f"chat template failed: {exc}; check the messages or chat_template.jinja") from exc


def chat_ids(generator: Generator, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation, exactly as encoded (the template places BOS)."""
    return generator.encode(generator.tokenizer.encode(render_chat(generator.bundle, messages,
                                                                   add_generation_prompt)))
