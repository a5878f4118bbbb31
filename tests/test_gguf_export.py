"""GGUF as a source: a tiny Llama written with gguf.GGUFWriter (Q8_0 and F16 tensors, q/k permuted
the way llama.cpp's convert script does) exports to a bundle whose greedy tokens equal transformers'
own GGUF loading; the rebuilt tokenizer equals transformers' GGUF tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_writer import F16, Q8, TEMPLATE, byte_level_tokens, write_gguf  # noqa: E402

from gptedge.exporter import ExportConfig, export  # noqa: E402
from gptedge.exporter.checkpoints.detect import detect_format, load_checkpoint  # noqa: E402
from gptedge.runtime import load  # noqa: E402
from gptedge.runtime.errors import UnsupportedModelError  # noqa: E402

# Every type gguf-py can also write (the K-quants it only reads): each linear weight of the tiny
# model is stored in one of them, so each dequantization path is checked against transformers.
LINEAR_TYPES = [gguf.GGMLQuantizationType[name] for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16")]


def write_tiny_llama(path: Path, declared: str | None = None, tied: bool = False, extra=None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(byte_level_tokens()), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
    types = iter(LINEAR_TYPES * 3)

    def qtype(name: str):
        if name == "token_embd.weight":
            return Q8
        return F16 if name == "output.weight" or name.endswith("attn_v.weight") else next(types)
    write_gguf(path, LlamaForCausalLM(cfg), "llama", qtype=qtype, declared=declared, extra=extra)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.gguf"
    write_tiny_llama(path)
    export(path, ExportConfig(validate=False), folder / "bundle")
    return path, folder / "bundle"


def test_greedy_equals_transformers_gguf_loading(tiny):
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, bundle = tiny  # transformers' own GGUF reading (from_pretrained(gguf_file=) would need accelerate)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)).eval()
    model.load_state_dict(load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"], strict=True)
    generator = load(bundle, backend="ort-cpu")
    for prompt in ([5, 40, 77, 260, 9], [100, 100, 3]):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert generator.generate(prompt, max_new_tokens=12, ignore_eos=True).tokens == want


def test_tokenizer_and_chat_template(tiny):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path, bundle = tiny
    ours = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["the cat is the best", "<|im_start|>user\nhé 12<|im_end|>", "  a\tthe"]:
        assert ours.encode(text).ids == theirs.encode(text, add_special_tokens=False)
    assert load_checkpoint(path, ExportConfig()).chat_template == TEMPLATE


def test_detected_by_magic_and_unknown_arch_refused(tmp_path):
    path = tmp_path / "model.weights"
    write_tiny_llama(path, declared="mamba")
    assert detect_format(path) == "gguf"
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported") as info:
        load_checkpoint(path, ExportConfig())
    assert info.value.exit_code == 3


def test_missing_output_weight_means_a_tied_head(tmp_path):
    write_tiny_llama(tmp_path / "tied.gguf", tied=True)
    checkpoint = load_checkpoint(tmp_path / "tied.gguf", ExportConfig())
    assert checkpoint.arch.tie_word_embeddings
    assert "lm_head.weight" not in checkpoint.state_dict
    bundle = export(tmp_path / "tied.gguf", ExportConfig(), tmp_path / "bundle")
    assert bundle.manifest.parity["passed"]
    # the parity reference is transformers' own GGUF loading (built on the meta device, tied head)
    assert bundle.manifest.source["reference"] == "transformers GGUF loading"


def test_rope_frequency_tensors_are_refused_by_name(tmp_path):
    # Llama 3.1 GGUFs store their RoPE scaling as a rope_freqs tensor the decoder does not read
    write_tiny_llama(tmp_path / "l31.gguf", extra={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    with pytest.raises(UnsupportedModelError, match=r"rope_freqs\.weight"):
        load_checkpoint(tmp_path / "l31.gguf", ExportConfig())
