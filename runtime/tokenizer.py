"""Text <-> token ids for a bundle, chosen by ``manifest.tokenizer.kind``.

Kinds: ``"hf"`` (a ``tokenizers`` ``tokenizer.json``), ``"char"`` (nanoGPT char level),
``"llama2c"`` (llama2.c's sentencepiece-like tokenizer, run.c's algorithm exactly) and ``"none"``
(the bundle generates from token ids only). ``encode`` never adds BOS; :func:`with_bos` holds the
one rule for that. ``decode`` ignores ids the tokenizer does not know
(models often pad their vocabulary, e.g. GPT-2 50304 vs 50257).

:class:`IncrementalDecoder` turns a growing list of ids into text pieces that never split a
UTF-8 character (streaming).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Protocol

from gptedge.runtime.bundle import Bundle, TokenizerInfo
from gptedge.runtime.errors import BundleError, GenerationError

REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer(Protocol):
    kind: str
    vocab_size: int  # ids 0 .. vocab_size-1 decode to text; larger ids decode to nothing

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; incomplete UTF-8 sequences become U+FFFD."""
        ...


class HfTokenizer:
    """A HuggingFace ``tokenizers`` tokenizer (GPT-2 byte-level BPE, Llama sentencepiece BPE ...)."""

    kind = "hf"

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a plain Exception for malformed files
            raise BundleError(f"{path}: cannot read the tokenizer ({exc}); re-export the bundle") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        known = [int(i) for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(known, skip_special_tokens=False)


class CharTokenizer:
    """nanoGPT character-level: id i <-> ``itos[i]``."""

    kind = "char"

    def __init__(self, itos: Sequence[str]) -> None:
        self.itos = list(itos)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            raise GenerationError(f"character {exc.args[0]!r} is not in this model's character vocabulary "
                                  f"({self.vocab_size} characters); remove it from the prompt") from exc

    def decode(self, ids: Sequence[int]) -> str:
        n = self.vocab_size
        return "".join(self.itos[i] for i in ids if 0 <= i < n)


class Llama2cTokenizer:
    """llama2.c's tokenizer, encode/decode as in its ``run.c``: a dummy-prefix space, one piece per
    UTF-8 character (byte fallback: id = byte + 3), then repeatedly merge the adjacent pair whose
    merged string has the highest score. BOS is id 1 (a piece after BOS drops its leading space)."""

    kind = "llama2c"
    BOS, EOS = 1, 2
    BYTE_OFFSET = 3

    def __init__(self, pieces: Sequence[str], scores: Sequence[float]) -> None:
        if len(pieces) != len(scores):
            raise BundleError(f"llama2c tokenizer: {len(pieces)} pieces but {len(scores)} scores; re-export")
        self.pieces = list(pieces)
        self.scores = [float(s) for s in scores]
        self.vocab_size = len(self.pieces)
        self._ids: dict[str, int] = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)
        self._bytes = [self._piece_bytes(p) for p in self.pieces]
        for control in (self.BOS, self.EOS):  # "\n<s>\n" / "\n</s>\n" are markers, not text
            if control < self.vocab_size:
                self._bytes[control] = b""

    @staticmethod
    def _piece_bytes(piece: str) -> bytes:
        match = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(match.group(1), 16)]) if match else piece.encode("utf-8")

    def encode(self, text: str) -> list[int]:
        tokens: list[int] = []
        if text:
            space = self._ids.get(" ")
            if space is not None:  # run.c always adds this dummy prefix; every llama2.c vocab has " "
                tokens.append(space)
        for char in text:
            token = self._ids.get(char)
            if token is not None:
                tokens.append(token)
            else:
                tokens.extend(b + self.BYTE_OFFSET for b in char.encode("utf-8"))
        return self._merge(tokens)

    def _merge(self, tokens: list[int]) -> list[int]:
        while True:
            best_score, best_id, best_index = -1e10, -1, -1
            for i in range(len(tokens) - 1):
                merged = self._ids.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best_score, best_id, best_index = self.scores[merged], merged, i
            if best_index == -1:
                return tokens
            tokens[best_index:best_index + 2] = [best_id]

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        previous = -1
        for token in ids:
            if 0 <= token < self.vocab_size:
                raw = self._bytes[token]
                if previous == self.BOS and raw.startswith(b" "):
                    raw = raw[1:]
                out += raw
            previous = token
        return out.decode("utf-8", errors="replace")


class NoTokenizer:
    """Bundles exported without a tokenizer: prompts must be token ids; output text is empty."""

    kind = "none"
    vocab_size = 0

    def encode(self, text: str) -> list[int]:
        raise GenerationError("this bundle has no tokenizer (exported with --no-tokenizer); pass the prompt "
                              "as a list of token ids, or re-export with --tokenizer")

    def decode(self, ids: Sequence[int]) -> str:
        return ""


def with_bos(info: TokenizerInfo, ids: Sequence[int]) -> list[int]:
    """The one BOS rule: ``ids``, the encoded text that opens a sequence, with ``info.bos_id`` put
    first when the manifest says the tokenizer adds one (``add_bos`` and a ``bos_id``). Only text
    gets it: token ids a caller passes are used as given, and a chat template places BOS itself."""
    if info.add_bos and info.bos_id is not None:
        return [info.bos_id, *ids]
    return list(ids)


def load_tokenizer(bundle: Bundle) -> Tokenizer:
    """The tokenizer described by ``bundle.manifest.tokenizer``; BundleError when it could produce
    ids the model has no embedding for."""
    tokenizer = _open_tokenizer(bundle)
    model_vocab = bundle.manifest.architecture.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise BundleError(f"{bundle.path / str(bundle.manifest.tokenizer.file)}: the tokenizer has "
                          f"{tokenizer.vocab_size} tokens but the model only {model_vocab}, so prompts could hold "
                          "ids the model cannot embed; re-export with the tokenizer that belongs to the checkpoint")
    return tokenizer


def _open_tokenizer(bundle: Bundle) -> Tokenizer:
    info = bundle.manifest.tokenizer
    if info.kind == "none":
        return NoTokenizer()
    if not info.file:
        raise BundleError(f"{bundle.path}: manifest.tokenizer.kind is {info.kind!r} but names no file; re-export")
    path = bundle.path / info.file
    if not path.is_file():
        raise BundleError(f"{path}: tokenizer file missing; copy the whole bundle folder again")
    if info.kind == "hf":
        return HfTokenizer(str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: malformed tokenizer JSON ({exc}); re-export the bundle") from exc
    if info.kind == "char" and isinstance(data, dict) and isinstance(data.get("itos"), list):
        return CharTokenizer(data["itos"])
    if info.kind == "llama2c" and isinstance(data, dict) and "pieces" in data and "scores" in data:
        return Llama2cTokenizer(data["pieces"], data["scores"])
    if info.kind not in ("char", "llama2c"):
        raise BundleError(f"{bundle.path}: unknown tokenizer kind {info.kind!r}; upgrade gptedge")
    raise BundleError(f"{path}: not a {info.kind} tokenizer file; re-export the bundle")


class IncrementalDecoder:
    """Decode a growing list of generated ids into stable text pieces (vLLM's scheme).

    Only a short window of ids is decoded per token, so the cost does not grow with the output.
    A piece whose decoded tail is U+FFFD (half a UTF-8 character) is held back until the next
    token completes it. ``context`` (the last prompt ids) gives tokenizers that strip a leading
    space at the start of a text (sentencepiece) the left context they need.
    Concatenating every :meth:`add` result and :meth:`flush` equals :meth:`text_of` the whole list.
    """

    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        ctx = [int(i) for i in context][-self.CONTEXT:]
        if tokenizer.decode(ctx).endswith(REPLACEMENT):
            ctx = []  # the prompt ends inside a character: its text is no safe prefix
        self.ids = ctx
        self.prefix_offset = 0
        self.read_offset = len(ctx)

    def add(self, token: int) -> str:
        """Append one id; return the newly stable text (often "")."""
        self.ids.append(int(token))
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tok.decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Text still held back at the end (a truly incomplete character decodes as U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tok.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]

    @staticmethod
    def text_of(tokenizer: Tokenizer, generated: Sequence[int], context: Sequence[int] = ()) -> str:
        """The whole text of ``generated`` in one decode (what the pieces add up to)."""
        dec = IncrementalDecoder(tokenizer, context)
        ctx = dec.ids
        full = tokenizer.decode([*ctx, *generated])
        return full[len(tokenizer.decode(ctx)):]
