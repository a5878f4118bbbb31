"""The chat template a bundle keeps: read from an HF folder (or set by a loader such as GGUF) and
written as ``chat_template.jinja`` with the special token strings the template needs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_config import read_json_object
from gptedge.runtime.bundle import TokenizerInfo

TEMPLATE_NAME = "chat_template.jinja"
# Tokens that end an assistant turn in common templates; generation must stop there too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def read_hf_chat_template(folder: Path) -> str | None:
    """The template of an HF tokenizer folder: ``chat_template.jinja``, else ``chat_template`` of
    ``tokenizer_config.json`` (a string, or a list of ``{name, template}`` whose "default" is used)."""
    jinja = folder / TEMPLATE_NAME
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    template = read_json_object(config_path, "; fix or remove the file").get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _token_string(value: Any) -> str | None:
    if isinstance(value, dict):  # serialised AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def template_tokenizer_info(info: TokenizerInfo, template: str, tokenizer_json: bytes | None,
                            tokenizer_config: dict[str, Any]) -> TokenizerInfo:
    """``info`` plus the template's file name, its ``bos_token``/``eos_token`` strings (from
    ``tokenizer_config`` or the tokenizer's vocabulary) and end-of-turn ids folded into ``eos_ids``."""
    tokenizer = None
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))

    def string_of(name: str, token_id: int | None) -> str | None:
        text = _token_string(tokenizer_config.get(f"{name}_token"))
        if text is None and tokenizer is not None and token_id is not None:
            text = tokenizer.id_to_token(token_id)
        return text

    eos_ids = list(info.eos_ids)
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.token_to_id(token) if tokenizer is not None and token in template else None
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    return replace(info, chat_template=TEMPLATE_NAME, bos_token=string_of("bos", info.bos_id),
                   eos_token=string_of("eos", info.eos_ids[0] if info.eos_ids else None),
                   eos_ids=tuple(eos_ids))
