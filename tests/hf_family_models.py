"""Tiny random models of every HF family the decoder maps (2 layers, 64 wide, GQA, random norm weights
and biases, a sliding window shorter than the test prompts where the family has one), and their
bundles exported once per test session: test_hf_families.py checks them against transformers,
test_quantize_families.py quantizes the same bundles, test_hf_clients.py runs them in Optimum."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hf_folders import SMALL_VOCAB, small_tokenizer

from gptedge.exporter import ExportConfig, export

CONTEXT = 64
WINDOW = 6  # below the export parity's 7-token prompt and the greedy prompt, so both cross the band
NEW_TOKENS = 24
PROMPT = [(7 * i + 3) % (SMALL_VOCAB - 4) + 4 for i in range(20)]
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)]}

# case -> (model_type, config keywords, whether model_ort.onnx is expected)
CASES: dict[str, tuple[str, dict, bool]] = {
    "mistral-window": ("mistral", dict(sliding_window=WINDOW), True),
    "qwen2-window-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), True),
    "qwen3-qk-norm-window": ("qwen3", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0,
                                           attention_bias=True), False),
    "llama-yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 16}), True),
    "llama-longrope": ("llama", dict(rope_scaling=LONGROPE, original_max_position_embeddings=16), False),
    "llama-dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), True),
    "gemma": ("gemma", dict(tie_word_embeddings=True), True),
    "gemma2-window-softcap": ("gemma2", dict(sliding_window=WINDOW, query_pre_attn_scalar=24, tie_word_embeddings=True,
                                             attn_logit_softcapping=5.0, final_logit_softcapping=3.0), True),
    "gemma3-window-local-rope": ("gemma3_text", dict(sliding_window=WINDOW, query_pre_attn_scalar=24,
                                                     rope_local_base_freq=100.0, tie_word_embeddings=True,
                                                     rope_scaling={"rope_type": "linear", "factor": 2.0}), False),
    "phi3-longrope-window": ("phi3", dict(sliding_window=WINDOW, rope_scaling={"type": "su", **{
        k: LONGROPE[k] for k in ("short_factor", "long_factor")}},
                                          original_max_position_embeddings=16), False),
    "granite-multipliers": ("granite", dict(embedding_multiplier=3.0, residual_multiplier=0.5,
                                            attention_multiplier=0.2, logits_scaling=2.5), True),
    "olmo2-post-norms": ("olmo2", dict(), False),
    "smollm3-nope-window": ("smollm3", dict(no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=WINDOW),
                            True),
    "gpt_bigcode-mqa": ("gpt_bigcode", dict(multi_query=True), True),
    "gpt_bigcode-mha-tied": ("gpt_bigcode", dict(multi_query=False, tie_word_embeddings=True), True),
    "phi-partial-parallel": ("phi", dict(partial_rotary_factor=0.5), False),
    "gpt_neox-parallel": ("gpt_neox", dict(rotary_pct=0.5, use_parallel_residual=True), False),
    "stablelm-partial": ("stablelm", dict(partial_rotary_factor=0.25, use_qkv_bias=True), False),
    "starcoder2-window": ("starcoder2", dict(sliding_window=WINDOW, use_bias=True, norm_epsilon=1e-5), True),
}


OMIT = object()  # an override that leaves a size keyword out (FalconConfig's head_dim is read-only)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    sizes = dict(vocab_size=SMALL_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=CONTEXT,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    sizes.update(overrides)
    return AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if v is not OMIT})


def tiny_folder(path: Path, model_type: str, **overrides) -> Path:
    """A random model of ``model_type``; every 1-D weight (norms, biases) is randomised too, so a
    mapping that drops or misplaces one shows in the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
            else:  # wider than the usual 0.02, which greedy-decodes a random model into one repeated token;
                # a tied table also feeds the head, where that width makes one token win every step
                param.normal_(0.0, 0.02 if tied and "embed" in name else 0.15)
    model.save_pretrained(path)
    small_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": "</s>"}))
    return path



# more cases: GPT-J, CodeGen, OPT, OLMo, Helium
MORE_CASES: dict[str, tuple[str, dict, bool]] = {
    "gptj-interleaved-partial": ("gptj", dict(rotary_dim=8), False),
    # 8 heads: two per mp_num block, so the block layout of the fused qkv_proj is exercised
    "codegen-mp4-qkv": ("codegen", dict(num_attention_heads=8, head_dim=8, rotary_dim=4), False),
    # without biases: with them, this random post-LN model greedy-decodes one repeated token
    "opt-350m-post-norm-project-nobias": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32, ffn_dim=96,
                                                      enable_bias=False, tie_word_embeddings=True), True),
    "opt-125m-pre-norm": ("opt", dict(ffn_dim=96, tie_word_embeddings=True), True),
    "olmo-clip-qkv": ("olmo", dict(clip_qkv=0.5), True),
    "helium-interleaved-gqa": ("helium", dict(attention_bias=True, mlp_bias=True), True),
}

FALCON = dict(head_dim=OMIT, ffn_hidden_size=96)
# ALiBi and fused-QKV cases: Falcon, BLOOM, Cohere, Nemotron
ALIBI_CASES: dict[str, tuple[str, dict, bool]] = {
    "falcon-mqa-parallel-rope": ("falcon", dict(FALCON, multi_query=True, parallel_attn=True, bias=False), True),
    "falcon-mha-sequential-alibi-bias": ("falcon", dict(FALCON, multi_query=False, parallel_attn=False, alibi=True,
                                                        bias=True), False),
    "falcon-new-arch-gqa-rope": ("falcon", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2, bias=True),
                                 True),
    "falcon-new-arch-gqa-alibi": ("falcon", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2, alibi=True,
                                                 num_ln_in_parallel_attn=1), False),
    # 6 heads: ALiBi's slopes for a head count that is not a power of two; 96 wide: at 64 wide the
    # random model greedy-decodes one repeated token
    "bloom-alibi-6-heads": ("bloom", dict(seq_length=64, hidden_size=96, num_attention_heads=6), False),
    "cohere-qk-norm": ("cohere", dict(use_qk_norm=True, logit_scale=0.25, attention_bias=True), False),
    "cohere-interleaved": ("cohere", dict(logit_scale=0.5), True),
    "nemotron-relu2-partial": ("nemotron", dict(partial_rotary_factor=0.5), False),
}


_BUNDLES: dict[str, tuple[Path, Path]] = {}


def family_bundle(name: str, tmp_path_factory) -> tuple[Path, Path]:
    """(HF folder, bundle) of case ``name``, exported once per session (both graph variants)."""
    if name not in _BUNDLES:
        model_type, overrides, _ = {**CASES, **MORE_CASES, **ALIBI_CASES}[name]
        root = tmp_path_factory.mktemp(name)
        folder = tiny_folder(root / "hf", model_type, **overrides)
        export(folder, ExportConfig(last_logits_variant=True), root / "bundle")
        _BUNDLES[name] = (folder, root / "bundle")
    return _BUNDLES[name]
