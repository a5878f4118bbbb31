"""GGUF architectures beyond llama: a tiny random transformers model of each family is written to GGUF
the way llama.cpp converts it (tests/gguf_writer.py), exported by gptedge, and its greedy tokens are
checked against transformers' own GGUF loading of the same file — over a prompt longer than the
sliding window where the family has one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from gguf_writer import F16, Q8, byte_level_tokens, write_gguf  # noqa: E402

from gptedge.exporter import ExportConfig, export  # noqa: E402
from gptedge.runtime import load  # noqa: E402
from gptedge.runtime.bundle import load_bundle  # noqa: E402

pytestmark = pytest.mark.slow  # one export per architecture

WINDOW = 6
PROMPT = [40, 77, 260, 9, 100, 100, 3, 150, 61, 200]  # longer than WINDOW
NEW_TOKENS = 12
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)
# Where transformers' GGUF loader fills a key from its config defaults instead of the file (Qwen3's
# head_dim, Gemma's query_pre_attn_scalar, StableLM's rotary factor), the tiny model uses that default.
GEMMA = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=WINDOW,
             tie_word_embeddings=True)
# case -> (model_type, GGUF architecture, config overrides, storage type of the matrices)
CASES = {
    "qwen3-qk-norm-q8": ("qwen3", "qwen3", dict(head_dim=128), Q8),
    "phi3-fused": ("phi3", "phi3", dict(pad_token_id=0), F16),
    "gemma2-window-softcap": ("gemma2", "gemma2", GEMMA, F16),
    "gemma3-window-qk-norm-untied": ("gemma3_text", "gemma3", {**GEMMA, "tie_word_embeddings": False}, F16),
    "stablelm-partial-parallel": ("stablelm", "stablelm", dict(use_qkv_bias=True, use_parallel_residual=True), F16),
    "starcoder2-bias": ("starcoder2", "starcoder2", dict(tie_word_embeddings=True), F16),
    "gpt2-tied": ("gpt2", "gpt2", None, F16),
}


def tiny_model(model_type: str, overrides: dict | None):
    """A random model whose every vector (norms, biases) is randomised too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = len(byte_level_tokens())
    if overrides is None:  # GPT-2 spells its sizes differently; transformers' GGUF config keeps n_positions 1024
        cfg = AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=1024)
    else:
        cfg = AutoConfig.for_model(model_type, vocab_size=vocab, **{**SIZES, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
            else:  # a tied table also feeds the head, where a wide one makes one token win every step
                table = "embed" in name or "wte" in name
                param.normal_(0.0, 0.02 if cfg.tie_word_embeddings and table else 0.15)
    return model


def transformers_from_gguf(path: Path):
    """transformers' own reading of the GGUF file (config and dequantized, un-permuted tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    model.tie_weights()
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model_type, arch, overrides, qtype = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    write_gguf(root / "model.gguf", tiny_model(model_type, overrides), arch, qtype=lambda name: qtype)
    export(root / "model.gguf", ExportConfig(validate=False, max_context=64, last_logits_variant=False, ort_variant=False), root / "bundle")
    return request.param, root / "model.gguf", root / "bundle"


def test_greedy_tokens_equal_transformers_gguf_loading(case):
    name, path, bundle = case
    model = transformers_from_gguf(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert len(set(want)) > 3  # not a degenerate loop, which would hide differences
    generator = load(bundle, backend="ort-cpu")
    try:
        assert generator.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens == want
    finally:
        generator.close()
    manifest = load_bundle(bundle).manifest
    assert manifest.source["architecture"] == CASES[name][1]
    if "window" in name:
        assert manifest.architecture.sliding_window == WINDOW
