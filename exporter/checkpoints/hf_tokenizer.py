"""The tokenizer of an HF folder (or of ``--tokenizer``) and its special token ids.

Special ids are read from ``generation_config.json`` first (what ``generate`` uses), then
``config.json``, then the token strings of ``tokenizer_config.json``. ``eos`` may be a list (Llama 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints import TokenizerFiles
from gptedge.exporter.checkpoints.hf_config import read_json_object
from gptedge.exporter.checkpoints.tokenizers import hf_tokenizer_from_vocab_merges
from gptedge.exporter.config import ExportConfig
from gptedge.runtime.bundle import TokenizerInfo
from gptedge.runtime.errors import InputError

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def load_tokenizer(folder: Path, cfg: dict[str, Any], config: ExportConfig) -> TokenizerFiles:
    """Tokenizer files for the bundle plus :class:`TokenizerInfo`.

    The tokenizer is ``tokenizer.json`` in the folder (or in/at ``config.tokenizer``), else a GPT-2
    ``vocab.json`` + ``merges.txt`` pair converted to one. Without either this raises
    :class:`InputError` unless ``config.allow_missing_tokenizer``; then the info has kind ``"none"``
    but keeps the special ids, so generation from token ids still stops at EOS.
    """
    tokenizer_dir, tokenizer_file = _tokenizer_source(folder, config.tokenizer)
    tok_cfg = _optional_json(tokenizer_dir / "tokenizer_config.json")
    gen_cfg = _optional_json(folder / "generation_config.json")
    vocab, merges = tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt"
    if tokenizer_file is not None:
        data = tokenizer_file.read_bytes()
    elif vocab.is_file() and merges.is_file():  # older GPT-2 folders: build the byte-level BPE
        data = hf_tokenizer_from_vocab_merges(vocab, merges).files[TOKENIZER_NAME]
    elif config.allow_missing_tokenizer and config.tokenizer is None:
        return TokenizerFiles(info=_info(None, cfg, gen_cfg, tok_cfg, "none", None))
    else:
        hint = " (it has only a sentencepiece tokenizer.model; save it as tokenizer.json with " \
               "transformers' AutoTokenizer)" if (tokenizer_dir / "tokenizer.model").is_file() else ""
        raise InputError(f"{tokenizer_dir}: no tokenizer.json{hint}; pass --tokenizer PATH to a tokenizer.json "
                         "or its folder, or --no-tokenizer to export a bundle that works on token ids")
    tokenizer = _load(data, tokenizer_file or vocab)
    files = {TOKENIZER_NAME: data}
    for name in TOKENIZER_SIDE_FILES:
        if (tokenizer_dir / name).is_file():
            files[name] = (tokenizer_dir / name).read_bytes()
    return TokenizerFiles(info=_info(tokenizer, cfg, gen_cfg, tok_cfg, "hf", TOKENIZER_NAME), files=files)


def _tokenizer_source(folder: Path, override: Path | None) -> tuple[Path, Path | None]:
    """(folder holding the tokenizer and its side files, its tokenizer.json or None)."""
    if override is None:
        directory = folder
    elif override.is_dir():
        directory = override
    elif override.is_file():
        if override.name in ("vocab.json", "merges.txt"):
            return override.parent, None
        return override.parent, override
    else:
        raise InputError(f"--tokenizer {override}: does not exist; give a tokenizer.json or its folder")
    path = directory / TOKENIZER_NAME
    return directory, (path if path.is_file() else None)


def _load(data: bytes, where: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a plain Exception for every parse error
        raise InputError(f"{where}: not a HuggingFace tokenizers file ({exc})") from exc


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _info(tokenizer, cfg: dict[str, Any], gen_cfg: dict[str, Any], tok_cfg: dict[str, Any],
          kind: str, file: str | None) -> TokenizerInfo:
    bos = _special(tokenizer, "bos", gen_cfg, cfg, tok_cfg)
    eos = _special(tokenizer, "eos", gen_cfg, cfg, tok_cfg)
    pad = _special(tokenizer, "pad", gen_cfg, cfg, tok_cfg)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return TokenizerInfo(kind=kind, file=file, bos_id=_first(bos), eos_ids=eos_ids, pad_id=_first(pad),
                         add_bos=_add_bos(tokenizer, tok_cfg, _first(bos)),
                         vocab_size=tokenizer.get_vocab_size() if tokenizer is not None else None)


def _special(tokenizer, name: str, gen_cfg: dict[str, Any], cfg: dict[str, Any],
             tok_cfg: dict[str, Any]) -> int | list[int] | None:
    for source in (gen_cfg, cfg):
        value = source.get(f"{name}_token_id")
        if isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, list) and value and all(isinstance(v, int) for v in value)):
            return value
    token = tok_cfg.get(f"{name}_token")
    if isinstance(token, dict):  # serialised AddedToken
        token = token.get("content")
    if isinstance(token, str) and tokenizer is not None:
        return tokenizer.token_to_id(token)
    return None


def _first(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) else value


def _add_bos(tokenizer, tok_cfg: dict[str, Any], bos_id: int | None) -> bool:
    """Whether text prompts start with BOS: ``add_bos_token`` when the config says so (Llama 1/2),
    else whether the tokenizer's own post-processor prepends BOS (Llama 3's template)."""
    flag = tok_cfg.get("add_bos_token")
    if isinstance(flag, bool):
        return flag
    if tokenizer is None or bos_id is None:
        return False
    with_special = tokenizer.encode("a", add_special_tokens=True).ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    return with_special[:1] == [bos_id] and plain[:1] != [bos_id]
