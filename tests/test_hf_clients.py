"""Bundles exported from HF folders run in other people's runtimes: Optimum's ORTModelForCausalLM and
onnxruntime-genai, giving the same greedy tokens as transformers' own ``generate``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hf_family_models import family_bundle
from hf_folders import exported, gpt2_tokenizer

pytest.importorskip("transformers")
NEW_TOKENS = 10
# test_hf_families.py's cases (one per model_type) whose bundles Optimum's ORTModelForCausalLM runs.
# Not here: phi, phi3, gemma2, olmo2, starcoder2 — Optimum sizes the empty past with
# num_attention_heads for model types outside its GQA list, and these tiny models use GQA, so ORT
# refuses past_key_values.*.key's shape (a limit of Optimum's decoder class, not of the bundle); olmo
# too. Falcon with ALiBi: the reference here is transformers' eager attention, which adds ALiBi twice
# (test_hf_families.py compares with sdpa instead).
# mistral and qwen2 take llama's path through Optimum (ran by hand, left out to keep CI lean).
# CI runs the types whose cache or attention Optimum treats apart from Llama's; GPTEDGE_ALL_FAMILIES=1
# adds the rest (all 16 passed on 2026-12-02).
OPTIMUM_FAMILIES = ["qwen3-qk-norm-window", "gemma3-window-local-rope", "gpt_bigcode-mqa", "falcon-mqa-parallel-rope",
                    "bloom-alibi-6-heads", "cohere-interleaved", "nemotron-relu2-partial", "opt-125m-pre-norm"]
if os.environ.get("GPTEDGE_ALL_FAMILIES") == "1":
    OPTIMUM_FAMILIES += ["gemma", "smollm3-nope-window", "stablelm-partial", "gpt_neox-parallel", "granite-multipliers",
                         "gptj-interleaved-partial", "codegen-mp4-qkv", "helium-interleaved-gqa"]


def _prompts(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts (ids [2, L], mask [2, L]); GPT-2's from real text when its tokenizer is here."""
    tokenizer = gpt2_tokenizer() if kind == "gpt2" else None
    if tokenizer is not None:
        rows = [tokenizer.encode(t).ids for t in ("The quick brown fox jumps over", "Hello world")]
    else:
        rows = [[5, 17, 3, 42, 61, 9, 77], [12, 88, 30]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _hf_greedy(folder, ids, mask) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    pad = model.generation_config.pad_token_id
    eos = model.generation_config.eos_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)


def _assert_optimum_like_transformers(folder, bundle, kind: str) -> None:
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForCausalLM

    ids, mask = _prompts(kind)
    expected = _hf_greedy(folder, ids, mask)
    model = ORTModelForCausalLM.from_pretrained(bundle, use_cache=True, use_io_binding=False, file_name="model.onnx")
    pad = model.generation_config.pad_token_id  # may be 0, which is a real id
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=expected[0, 0].item() if pad is None else pad)
    assert got.tolist() == expected.tolist()
    assert len(set(expected[:, ids.shape[1]:].flatten().tolist())) > 2  # not degenerate one-token loops


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_optimum_runs_the_bundle_like_transformers(tmp_path_factory, kind):
    _assert_optimum_like_transformers(*exported(kind, tmp_path_factory), kind)


@pytest.mark.slow  # the family bundles are test_hf_families.py's (one export each per session)
@pytest.mark.parametrize("case", OPTIMUM_FAMILIES)
def test_optimum_runs_family_bundles_like_transformers(tmp_path_factory, case):
    _assert_optimum_like_transformers(*family_bundle(case, tmp_path_factory), case)


def test_onnxruntime_genai_runs_the_llama_bundle_like_transformers(tmp_path_factory):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (optional client)")
    folder, bundle = exported("llama", tmp_path_factory)
    ids, mask = _prompts("llama")
    prompt = ids[0:1]  # og's Python API takes one unpadded prompt per generator here
    expected = _hf_greedy(folder, prompt, torch.ones_like(prompt))[0].tolist()
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prompt.shape[1] + NEW_TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert [int(t) for t in generator.get_sequence(0)] == expected
