"""Generator end to end on exported bundles: parity with transformers, batches, streams, threads,
sessions, stop strings, context limits and scoring."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hf_folders import exported

from gptedge.runtime import GenerationResult, Generator, SamplingOptions, load
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.errors import GenerationError
from gptedge.runtime.kv_cache import KVSequence
from gptedge.runtime.tokenizer import REPLACEMENT

PROMPTS = [[5, 17, 33, 2, 61, 8, 40], [12, 3], [70, 71, 72, 73]]


@pytest.fixture(scope="module")
def gen(llama_bundle):
    with load(llama_bundle, backend="ort-cpu", threads=1) as generator:
        yield generator


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    return exported("gpt2", tmp_path_factory)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(tmp_path_factory, kind):
    from transformers import AutoModelForCausalLM

    folder, bundle = exported(kind, tmp_path_factory)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None  # both sides: exactly max_new_tokens
    generator = load(bundle, backend="ort-cpu")
    for prompt in ([1, 9, 4, 22, 7, 30], [8, 8, 50]):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  pad_token_id=0)[0, len(prompt):].tolist()
        got = generator.generate(prompt, max_new_tokens=20, ignore_eos=True)
        assert got.tokens == want
        assert got.finish_reason == "length" and got.timings["new_tokens"] == 20


def test_batch_with_left_padding_equals_each_prompt_alone(gen):
    batch = gen.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert isinstance(batch, list) and len(batch) == 3
    for prompt, result in zip(PROMPTS, batch):
        assert result.tokens == gen.generate(prompt, max_new_tokens=12, ignore_eos=True).tokens
        assert result.timings["prompt_tokens"] == len(prompt)


def test_finished_rows_stop_at_eos_while_others_continue(llama_bundle, gen):
    first = gen.generate(PROMPTS[1], max_new_tokens=3).tokens[1]  # row 1 emits this id second
    bundle = load_bundle(llama_bundle)
    tokenizer = dataclasses.replace(bundle.manifest.tokenizer, eos_ids=(first,))
    bundle.manifest = dataclasses.replace(bundle.manifest, tokenizer=tokenizer)
    with_eos = Generator(bundle, gen.backend)
    batch = with_eos.generate(PROMPTS, max_new_tokens=10)
    alone = [gen.generate(p, max_new_tokens=10, ignore_eos=True).tokens for p in PROMPTS]
    assert batch[1].finish_reason == "eos" and batch[1].tokens == alone[1][:2]
    for result, want in zip(batch, alone):
        cut = want.index(first) + 1 if first in want else len(want)
        assert result.tokens == want[:cut]
    exact = with_eos.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True)
    assert len(exact.tokens) == 10 and exact.finish_reason == "length"


def test_seeded_sampling_is_reproducible(gen):
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2)
    a = gen.generate(PROMPTS[0], seed=11, **kwargs).tokens
    assert a == gen.generate(PROMPTS[0], seed=11, **kwargs).tokens
    assert a != gen.generate(PROMPTS[0], seed=12, **kwargs).tokens
    options = SamplingOptions(seed=11, **kwargs)
    assert gen.generate(PROMPTS[0], options=options).tokens == a
    assert "".join(gen.stream(PROMPTS[0], options=options)) == gen.generate(PROMPTS[0], options=options).text


def test_threads_share_one_generator(gen):
    jobs = [(p, s) for p in PROMPTS for s in (None, 1)]

    def run(job):
        prompt, seed = job
        temperature = 0.0 if seed is None else 1.0
        return gen.generate(prompt, max_new_tokens=15, temperature=temperature, seed=seed, ignore_eos=True).tokens

    serial = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, jobs * 2)) == serial * 2


def test_session_turns_equal_the_concatenated_prompt(gen):
    session = gen.session()
    session.append([4, 9, 16])
    first = session.generate(max_new_tokens=6, ignore_eos=True)
    session.append([25, 36])
    second = session.generate(max_new_tokens=6, ignore_eos=True)
    whole = gen.generate([4, 9, 16, *first.tokens, 25, 36], max_new_tokens=6, ignore_eos=True)
    assert second.tokens == whole.tokens
    third = session.generate(max_new_tokens=4, ignore_eos=True)  # continue without new input
    again = gen.generate([4, 9, 16, *first.tokens, 25, 36, *second.tokens], max_new_tokens=4, ignore_eos=True)
    assert third.tokens == again.tokens
    assert session.ids == [4, 9, 16, *first.tokens, 25, 36, *second.tokens, *third.tokens]
    with pytest.raises(GenerationError, match="context of 64"):
        session.generate(max_new_tokens=64)


def test_context_overflow_and_truncation(gen):
    long = list(range(1, 61))
    with pytest.raises(GenerationError, match=r"60 tokens \+ max_new_tokens=10 .* 64 .*truncate_prompt"):
        gen.generate(long, max_new_tokens=10)
    cut = gen.generate(long, max_new_tokens=10, truncate_prompt=True, ignore_eos=True)
    assert cut.tokens == gen.generate(long[-54:], max_new_tokens=10, ignore_eos=True).tokens
    with pytest.raises(GenerationError, match="max_new_tokens"):
        gen.generate([1, 2], max_new_tokens=0)
    with pytest.raises(GenerationError, match="token ids"):
        gen.generate("text needs a tokenizer")
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        gen.generate([1, 500])


def test_stream_equals_generate_and_never_splits_utf8(hf_gpt2):
    _, bundle = hf_gpt2
    generator = load(bundle, backend="ort-cpu")
    for prompt in ("héllo 日本語", [1, 2, 3]):
        result = generator.generate(prompt, max_new_tokens=40, ignore_eos=True)
        stream = generator.stream(prompt, max_new_tokens=40, ignore_eos=True)
        pieces = list(stream)
        assert "".join(pieces) == result.text and result.text
        assert all(REPLACEMENT not in p for p in pieces if REPLACEMENT not in result.text)
        assert stream.result.tokens == result.tokens


def test_stop_strings_cut_text_in_generate_and_stream(hf_gpt2):
    _, bundle = hf_gpt2
    generator = load(bundle, backend="ort-cpu")
    full = generator.generate("Once", max_new_tokens=30, ignore_eos=True).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip()
    result = generator.generate("Once", max_new_tokens=30, ignore_eos=True, stop=[stop, "@@never@@"])
    assert result.finish_reason == "stop" and result.text == full[:full.index(stop)]
    assert "".join(generator.stream("Once", max_new_tokens=30, ignore_eos=True, stop=stop)) == result.text


def test_closing_a_stream_stops_the_work(hf_gpt2):
    _, bundle = hf_gpt2
    generator = load(bundle, backend="ort-cpu")
    calls = []
    original = generator.backend.step

    def counting_step(*args):
        calls.append(1)
        return original(*args)

    generator.backend.step = counting_step  # count the real backend's steps
    stream = generator.stream("Once upon", max_new_tokens=50, ignore_eos=True)
    next(stream)
    stream.close()
    steps_when_closed = len(calls)
    assert steps_when_closed < 20
    with pytest.raises(StopIteration):
        next(stream)
    assert len(calls) == steps_when_closed


def test_score_matches_incremental_log_probs(gen):
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    scores = gen.score(tokens)
    assert scores.shape == (7,) and scores.dtype == np.float32 and (scores < 0).all()
    sequence = KVSequence(gen.backend, 1, gen.max_context)
    want = []
    for i in range(len(tokens) - 1):
        logits = sequence.feed(np.array([[tokens[i]]], dtype=np.int64))[0].astype(np.float64)
        want.append(logits[tokens[i + 1]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
    np.testing.assert_allclose(scores, want, atol=1e-4)


def test_result_type(gen):
    result = gen.generate(PROMPTS[0], max_new_tokens=3)
    assert isinstance(result, GenerationResult)
    assert set(result.timings) == {"ttft_s", "decode_tokens_per_s", "prompt_tokens", "new_tokens"}
