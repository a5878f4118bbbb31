"""The real pretrained model end to end: SmolLM2-135M-Instruct (GGUF, Llama architecture, 30
layers) exports with its own parity check passing, chats like transformers, and every quantize
mode runs on it. One export serves every check; skipped without ../shared.

Quality budgets of the quantized bundles are benchmarks/real_model.py's business (issue 12); here
each mode must write a bundle that still answers the question.
"""

from __future__ import annotations

import pytest
from conftest import shared_file

from gptedge.exporter import ExportConfig, export
from gptedge.quantize import Fp16Config, Int4Config, Int8Config, Int8DynamicConfig, quantize
from gptedge.quantize.api import bundle_size_mb
from gptedge.runtime import load
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.trt.lint import lint_bundle

pytestmark = pytest.mark.slow
GGUF = ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
CONTEXT = 1024  # the model's 8k context only makes the quality gate's windows slower


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "fp32"
    return export(shared_file(*GGUF), ExportConfig(max_context=CONTEXT), out)


def _reply(bundle_dir) -> tuple[str, list[int]]:
    with load(bundle_dir, backend="ort-cpu") as generator:
        result = generator.chat(QUESTION, max_new_tokens=24)
    return result.text, result.tokens


def test_export_passes_its_own_parity_check(smol):
    parity = smol.manifest.parity
    assert parity and parity["passed"]
    assert parity["top1_agreement"] == 1.0
    assert smol.manifest.architecture.num_layers == 30 and smol.manifest.architecture.tie_word_embeddings


def test_greedy_chat_reply_is_transformers_reply(smol):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    text, tokens = _reply(smol.path)
    assert text == ANSWER
    path = shared_file(*GGUF)  # transformers' own GGUF reading (from_pretrained(gguf_file=) needs accelerate)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(path.parent, gguf_file=path.name)).eval()
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(state, strict=False)  # the tied lm_head is not stored
    model.tie_weights()
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    want = model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert tokens == want


def test_fp16_answers_like_fp32(smol, tmp_path):
    fp16 = quantize(smol.path, Fp16Config(), tmp_path / "fp16")
    assert fp16.manifest.precision["weights"] == "float16"
    assert _reply(fp16.path) == _reply(smol.path)


def _window_ppl(bundle_dir, windows: int = 4, length: int = 256) -> float:
    """Issue 16's protocol on a sample: the first windows x length tokens of wiki.test.raw, each
    window scored from its own start (README: 24 windows)."""
    import numpy as np

    from gptedge.quantize.text import encode
    from gptedge.runtime.backend import create_backend

    bundle = load_bundle(bundle_dir)
    text = shared_file("wikitext-2-raw", "wiki.test.raw").read_text(encoding="utf-8")[:100_000]
    ids = encode(bundle, text, "wiki.test.raw")[: windows * length].reshape(windows, length)
    backend = create_backend("ort-cpu", bundle)
    nll = 0.0
    try:
        for row in ids:
            logits = backend.full_logits(row[None], np.ones((1, length), np.int64),
                                         np.arange(length)[None])[0, :-1].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            nll -= float(logp[np.arange(length - 1), row[1:]].sum())
    finally:
        backend.close()
    return float(np.exp(nll / (windows * (length - 1))))


@pytest.fixture(scope="module")
def smol_ppl(smol) -> float:
    return _window_ppl(smol.path)


@pytest.mark.parametrize(("config", "max_mb", "max_pct"), [(Int8DynamicConfig(), 160, 1.0), (Int4Config(), 110, 3.0),
                                                           (Int4Config(format="qdq"), 110, 3.0)],
                         ids=["int8-dynamic", "int4", "int4-qdq"])
def test_weight_only_modes_hold_quality_and_size(smol, smol_ppl, tmp_path, config, max_mb, max_pct):
    calib = shared_file("wikitext-2-raw", "wiki.valid.raw").read_text(encoding="utf-8")[:60_000]
    (tmp_path / "calib.txt").write_text(calib, encoding="utf-8")
    out = quantize(smol.path, config, tmp_path / "out", calib_text=tmp_path / "calib.txt", max_ppl_increase=100.0,
                   max_tokens=1024)
    # issue 16's budgets (int8-dynamic 0.5 %, int4 3 % on 24 windows; 4 windows here are noisier)
    # and sizes: the tied table is one int8 copy serving the lookup and the head
    assert _window_ppl(out.path) <= smol_ppl * (1 + max_pct / 100)
    assert bundle_size_mb(out) <= max_mb
    assert out.manifest.history[-1]["lm_head"]["tied_table_shared"]
    # the chat reply: fp32 prefers "The" over "L" by 0.08 logits only. int8-dynamic keeps fp32's
    # sentence; the 4-bit forms open with "The..." or "L'Étoile..." depending on the calibration text
    # (measured: int4 also at fp32 accuracy level, so it is the weights, not the kernel) and must still
    # generate
    text, tokens = _reply(out.path)
    if isinstance(config, Int8DynamicConfig):
        assert text.startswith("The capital of France is Paris")
    else:
        assert tokens and text.strip()


def test_int8_static_runs(smol, tmp_path):
    calib = shared_file("wikitext-2-raw", "wiki.valid.raw").read_text(encoding="utf-8")[:60_000]
    (tmp_path / "calib.txt").write_text(calib, encoding="utf-8")
    # The README's +0.07 % (24 windows of wiki.test) uses the defaults: 16 calibration windows and
    # 4 search windows of 256 tokens (~19 min at load 4). CI's run is lighter (one 128-token search
    # window: ~100 s instead of ~7 min; it kept 12 inputs float plus the `down` rule's), so the gate's
    # budget here is 5 %; the collapse it guards against was +127 %.
    config = Int8Config(calib_windows=4, search_windows=1, search_seq_len=128)
    out = quantize(smol.path, config, tmp_path / "int8", calib_text=tmp_path / "calib.txt", max_ppl_increase=5.0,
                   max_tokens=2048)
    search = out.manifest.history[-1]["int8_search"]
    assert 0 < len(search["kept_float"]) < 121
    assert load_bundle(out.path).manifest.precision["activations"] == "int8"
    # issue 16's size: one int8 table serves the lookup and the head (was 252 MB with a float table)
    assert out.manifest.history[-1]["lm_head"]["tied_table_shared"] and bundle_size_mb(out) <= 160
    assert lint_bundle(out.path, "10.3").ok
    with load(out.path, backend="ort-cpu") as generator:
        assert generator.chat(QUESTION, max_new_tokens=4).tokens
