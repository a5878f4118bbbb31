"""Tokenizer conversions into the bundle's tokenizer files (see ``gptedge.runtime.bundle``).

- nanoGPT char-level ``meta.pkl`` -> kind ``"char"``, ``tokenizer.char.json`` = ``{"itos": [...]}``
- llama2.c ``tokenizer.bin`` -> kind ``"llama2c"``, ``tokenizer.llama2c.json`` = ``{"pieces", "scores"}``
- GPT-2 ``vocab.json`` + ``merges.txt`` (or a ready ``tokenizer.json``) -> kind ``"hf"``, ``tokenizer.json``

Every function raises :class:`~gptedge.runtime.errors.InputError` naming the file when the input
is malformed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints import TokenizerFiles
from gptedge.exporter.safe_pickle import safe_load
from gptedge.runtime.bundle import TokenizerInfo
from gptedge.runtime.errors import InputError

CHAR_FILE = "tokenizer.char.json"
LLAMA2C_FILE = "tokenizer.llama2c.json"
HF_FILE = "tokenizer.json"
GPT2_EOS = "<|endoftext|>"
LLAMA2C_BOS, LLAMA2C_EOS = 1, 2


def char_tokenizer_from_meta(path: Path) -> TokenizerFiles:
    """nanoGPT ``meta.pkl`` (``{"vocab_size", "stoi", "itos"}``, itos a dict id -> char or a list),
    read with the restricted unpickler."""
    meta = safe_load(path)
    if not isinstance(meta, dict) or "itos" not in meta:
        raise InputError(f"{path}: not a nanoGPT char-level meta.pkl (expected a dict with 'itos'); "
                         "for GPT-2 BPE models pass --tokenizer with a tokenizer.json or vocab.json + merges.txt")
    itos = meta["itos"]
    if isinstance(itos, dict):
        if sorted(itos) != list(range(len(itos))):
            raise InputError(f"{path}: itos ids must be exactly 0..{len(itos) - 1}")
        itos = [itos[i] for i in range(len(itos))]
    if not isinstance(itos, (list, tuple)) or not itos or not all(isinstance(s, str) and s for s in itos):
        raise InputError(f"{path}: itos must map ids to non-empty strings")
    if len(set(itos)) != len(itos):
        raise InputError(f"{path}: itos has duplicate entries, so text cannot be encoded unambiguously")
    declared = meta.get("vocab_size")
    if declared is not None and declared != len(itos):
        raise InputError(f"{path}: vocab_size={declared!r} but itos has {len(itos)} entries")
    data = json.dumps({"itos": list(itos)}, ensure_ascii=False).encode("utf-8")
    info = TokenizerInfo(kind="char", file=CHAR_FILE, vocab_size=len(itos))
    return TokenizerFiles(info=info, files={CHAR_FILE: data})


def read_llama2c_tokenizer(path: Path) -> tuple[list[str], list[float], int]:
    """Parse llama2.c ``tokenizer.bin``: int32 max_token_length, then per token float32 score,
    int32 byte length, UTF-8 bytes (until the end of the file). Returns (pieces, scores, max_len)."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise InputError(f"{path}: {len(data)} bytes is too short for a llama2.c tokenizer.bin")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if max_len <= 0:
        raise InputError(f"{path}: max_token_length={max_len} must be positive; not a llama2.c tokenizer.bin")
    pieces: list[str] = []
    scores: list[float] = []
    offset = 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise InputError(f"{path}: truncated record header for token {len(pieces)} at byte {offset}")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or offset + length > len(data):
            raise InputError(f"{path}: token {len(pieces)} claims {length} bytes at byte {offset - 4}, "
                             f"but the file has {len(data) - offset} left; the file is truncated or not a tokenizer.bin")
        raw = data[offset:offset + length]
        offset += length
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: token {len(pieces)} is not valid UTF-8 ({raw!r})") from exc
        scores.append(score)
    if len(pieces) <= LLAMA2C_EOS:
        raise InputError(f"{path}: only {len(pieces)} tokens; llama2.c needs at least <unk>, <s>, </s>")
    return pieces, scores, max_len


def llama2c_tokenizer(path: Path) -> TokenizerFiles:
    """llama2.c ``tokenizer.bin`` -> kind ``"llama2c"`` (BOS 1, EOS 2, BOS prepended to prompts)."""
    pieces, scores, _ = read_llama2c_tokenizer(path)
    data = json.dumps({"pieces": pieces, "scores": scores}, ensure_ascii=False).encode("utf-8")
    info = TokenizerInfo(kind="llama2c", file=LLAMA2C_FILE, bos_id=LLAMA2C_BOS, eos_ids=(LLAMA2C_EOS,),
                         add_bos=True, vocab_size=len(pieces))
    return TokenizerFiles(info=info, files={LLAMA2C_FILE: data})


def hf_tokenizer_from_json(path: Path) -> TokenizerFiles:
    """A ready ``tokenizer.json`` (e.g. GPT-2's), copied unchanged; EOS = ``<|endoftext|>`` if present."""
    from tokenizers import Tokenizer

    data = Path(path).read_bytes()
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
        raise InputError(f"{path}: not a valid tokenizers tokenizer.json ({exc})") from exc
    return TokenizerFiles(info=_hf_info(tokenizer), files={HF_FILE: data})


def hf_tokenizer_from_vocab_merges(vocab: Path, merges: Path) -> TokenizerFiles:
    """GPT-2-style ``vocab.json`` + ``merges.txt`` -> a byte-level BPE ``tokenizer.json`` (no
    prefix space, no BOS, ``<|endoftext|>`` registered as a special token when in the vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        vocab_map = json.loads(Path(vocab).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{vocab}: not a JSON vocabulary ({exc})") from exc
    if not isinstance(vocab_map, dict) or not all(isinstance(v, int) for v in vocab_map.values()):
        raise InputError(f"{vocab}: expected a JSON object mapping token -> id")
    try:
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:  # tokenizers reports malformed merges as a plain Exception
        raise InputError(f"{merges}: cannot build a BPE tokenizer from {vocab.name} + {merges.name} ({exc})") from exc
    # what tokenizers' ByteLevelBPETokenizer (and HF's GPT-2 tokenizer.json) sets up
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if GPT2_EOS in vocab_map:
        tokenizer.add_special_tokens([GPT2_EOS])
    data = tokenizer.to_str().encode("utf-8")
    return TokenizerFiles(info=_hf_info(tokenizer), files={HF_FILE: data})


def _hf_info(tokenizer: Any) -> TokenizerInfo:
    eos = tokenizer.token_to_id(GPT2_EOS)
    return TokenizerInfo(kind="hf", file=HF_FILE, eos_ids=() if eos is None else (eos,), add_bos=False,
                         vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))


def tokenizer_from_user_path(path: Path, default_kind: str) -> TokenizerFiles:
    """Whatever ``--tokenizer`` points at: ``meta.pkl``, ``tokenizer.bin``, ``tokenizer.json``,
    ``vocab.json`` (with ``merges.txt`` beside it), or a folder holding one of these.
    ``default_kind`` (``"char"`` or ``"llama2c"``) decides for a folder holding several."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--tokenizer {path}: does not exist")
    if path.is_dir():
        order = ["meta.pkl", "tokenizer.json", "vocab.json", "tokenizer.bin"]
        if default_kind == "llama2c":
            order = ["tokenizer.bin", "tokenizer.json", "vocab.json", "meta.pkl"]
        for name in order:
            if (path / name).is_file():
                return tokenizer_from_user_path(path / name, default_kind)
        raise InputError(f"--tokenizer {path}: folder holds none of {', '.join(order)}")
    name = path.name
    if name.endswith(".pkl"):
        return char_tokenizer_from_meta(path)
    if name == "vocab.json":
        merges = path.with_name("merges.txt")
        if not merges.is_file():
            raise InputError(f"--tokenizer {path}: needs merges.txt in the same folder")
        return hf_tokenizer_from_vocab_merges(path, merges)
    if name == "merges.txt":
        return tokenizer_from_user_path(path.with_name("vocab.json"), default_kind)
    if name.endswith(".json"):
        return hf_tokenizer_from_json(path)
    if name.endswith(".bin"):
        return llama2c_tokenizer(path)
    raise InputError(f"--tokenizer {path}: unknown tokenizer file; give meta.pkl, tokenizer.json, "
                     "vocab.json + merges.txt, or tokenizer.bin")
