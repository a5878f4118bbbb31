"""Tokenizers of every kind, read from real files, and UTF-8-safe incremental decoding."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import TINY_GPT2, shared_file

from gptedge.runtime.bundle import Bundle, Manifest, TokenizerInfo
from gptedge.runtime.errors import BundleError, GenerationError
from gptedge.runtime.tokenizer import REPLACEMENT, IncrementalDecoder, load_tokenizer, with_bos

TEXT = "héllo 日本語 🙂"


def bundle_with(tmp_path, kind: str, file: str | None, data: bytes | None = None) -> Bundle:
    if data is not None:
        (tmp_path / file).write_bytes(data)
    # a model vocabulary as large as GPT-2's: load_tokenizer refuses tokenizers larger than the model
    arch = dataclasses.replace(TINY_GPT2, vocab_size=50304)
    return Bundle(tmp_path, Manifest(architecture=arch, tokenizer=TokenizerInfo(kind=kind, file=file)))


def stream_pieces(tokenizer, ids, context=()):
    decoder = IncrementalDecoder(tokenizer, context)
    pieces = [decoder.add(i) for i in ids]
    pieces.append(decoder.flush())
    return [p for p in pieces if p]


# -- llama2.c ----------------------------------------------------------------------------------
BYTES = [f"<0x{b:02X}>" for b in range(256)]
L2C_PIECES = ["<unk>", "\n<s>\n", "\n</s>\n", *BYTES, " ", "a", "b", "c", " a", "ab", " ab", "é"]
L2C_SCORES = [0.0] * (3 + 256) + [0.0, 0.0, 0.0, 0.0, -3.0, -1.0, -2.0, 0.0]
SPACE, A, B, C, SPACE_A, AB, SPACE_AB, E_ACUTE = range(259, 267)


@pytest.fixture
def llama2c(tmp_path):
    data = json.dumps({"pieces": L2C_PIECES, "scores": L2C_SCORES}).encode()
    return load_tokenizer(bundle_with(tmp_path, "llama2c", "tokenizer.llama2c.json", data))


def test_llama2c_encode_merges_by_best_score_like_run_c(llama2c):
    # " ab": candidates " a" (-3) and "ab" (-1): "ab" merges first, then " " + "ab" -> " ab" (-2)
    assert llama2c.encode("ab") == [SPACE_AB]
    assert llama2c.encode("ca") == [SPACE, C, A]  # no " c" / "ca" piece
    assert llama2c.encode("é") == [SPACE, E_ACUTE]
    assert llama2c.encode("日") == [SPACE, *(b + 3 for b in "日".encode())]  # byte fallback: byte + 3
    assert llama2c.encode("") == []


def test_llama2c_decode_drops_space_after_bos_and_reads_byte_pieces(llama2c):
    assert llama2c.decode([1, SPACE_AB]) == "ab"
    assert llama2c.decode([SPACE_AB]) == " ab"
    assert llama2c.decode([1, *llama2c.encode("a日é")]) == "a日é"
    assert llama2c.decode([SPACE_A, 5000, 70000]) == " a"  # ids beyond the vocabulary decode to nothing


def test_llama2c_byte_tokens_stream_whole_characters(llama2c):
    ids = llama2c.encode("a日é🙂b")
    pieces = stream_pieces(llama2c, ids, context=[1])
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == "a日é🙂b" == IncrementalDecoder.text_of(llama2c, ids, [1])  # BOS eats the space
    assert len(pieces) < len(ids)  # multi-byte characters were held back until complete


# -- HuggingFace tokenizers --------------------------------------------------------------------
def test_gpt2_bpe_roundtrip_and_utf8_safe_streaming(tmp_path):
    path = shared_file("gpt2-tokenizer", "tokenizer.json")
    tok = load_tokenizer(bundle_with(tmp_path, "hf", "tokenizer.json", path.read_bytes()))
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)  # some tokens really are half characters
    pieces = stream_pieces(tok, ids)
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == TEXT
    assert tok.decode([*ids, 50300, 60000]) == TEXT  # padded-vocab ids decode to nothing
    context = tok.encode("Say:")
    assert "".join(stream_pieces(tok, ids, context)) == IncrementalDecoder.text_of(tok, ids, context) == TEXT


def test_tiny_wordlevel_and_bpe_tokenizers_built_here(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    word = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(bundle_with(tmp_path, "hf", "tokenizer.json"))
    assert tok.encode("hello world") == [1, 2]
    assert tok.decode([1, 2, 77]) == "hello world"

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["héllo wörld " * 20, "日本語 🙂 " * 20],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "b").mkdir()
    bpe.save(str(tmp_path / "b" / "tokenizer.json"))
    tok = load_tokenizer(bundle_with(tmp_path / "b", "hf", "tokenizer.json"))
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert "".join(stream_pieces(tok, ids)) == TEXT


# -- char and none -----------------------------------------------------------------------------
def test_char_tokenizer(tmp_path):
    itos = ["\n", " ", "a", "b", "é"]
    tok = load_tokenizer(bundle_with(tmp_path, "char", "tokenizer.char.json", json.dumps({"itos": itos}).encode()))
    assert tok.encode("ab é\n") == [2, 3, 1, 4, 0]
    assert tok.decode([2, 3, 1, 4, 0, 99]) == "ab é\n"
    with pytest.raises(GenerationError, match="'z'"):
        tok.encode("az")


def test_no_tokenizer_refuses_text_and_malformed_files_are_bundle_errors(tmp_path):
    tok = load_tokenizer(bundle_with(tmp_path, "none", None))
    with pytest.raises(GenerationError, match="token ids"):
        tok.encode("hi")
    assert tok.decode([1, 2]) == ""
    with pytest.raises(BundleError, match="malformed"):
        load_tokenizer(bundle_with(tmp_path, "char", "tokenizer.char.json", b"{not json"))
    with pytest.raises(BundleError, match="missing"):
        load_tokenizer(bundle_with(tmp_path, "llama2c", "absent.json"))


def test_with_bos_is_the_one_bos_rule():
    assert with_bos(TokenizerInfo(kind="hf", bos_id=1, add_bos=True), [7, 8]) == [1, 7, 8]
    assert with_bos(TokenizerInfo(kind="hf", bos_id=1, add_bos=False), [7, 8]) == [7, 8]
    assert with_bos(TokenizerInfo(kind="hf", bos_id=None, add_bos=True), (7, 8)) == [7, 8]
