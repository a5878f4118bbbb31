"""The generate loop's own logic on a fake backend (no torch, no graph): the fake's logits prefer
token ``(last + 1) % vocab``, so every expected sequence follows from that rule, and the fake
records what the loop fed it (ids, left padding, masks, positions, which array objects)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_backend import CHARS, VOCAB, FakeBackend, fake_bundle, fake_logits

from gptedge.runtime import Generator
from gptedge.runtime.errors import GenerationError

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def make(tmp_path):
    """``make(eos=..., pad=..., max_context=..., poison=...)`` -> (Generator, its FakeBackend)."""
    def build(eos: int | None = None, pad: int | None = None, max_context: int = 24,
              poison: dict[int, float] | None = None) -> tuple[Generator, FakeBackend]:
        backend = FakeBackend(poison=poison)
        return Generator(fake_bundle(tmp_path / "bundle", eos, pad, max_context), backend), backend
    return build


def successors(last: int, n: int) -> list[int]:
    """What greedy decoding of the fake gives after a prompt ending in ``last``."""
    return [(last + 1 + i) % VOCAB for i in range(n)]


def text(tokens: list[int]) -> str:
    return "".join(CHARS[t] for t in tokens)


def test_greedy_sequence_and_what_the_backend_receives(make):
    gen, fake = make()
    result = gen.generate([3, 9, 14], max_new_tokens=6)
    assert result.tokens == successors(14, 6)  # wraps around the vocabulary: 15, 0, 1, ...
    assert result.finish_reason == "length" and result.text == text(result.tokens)
    assert result.timings["prompt_tokens"] == 3 and result.timings["new_tokens"] == 6
    calls = fake.calls
    assert len(calls) == 6  # prefill + 5 decodes: the last sampled token is never fed
    assert len({id(c.state) for c in calls}) == 1
    np.testing.assert_array_equal(calls[0].ids, [[3, 9, 14]])
    np.testing.assert_array_equal(calls[0].mask, np.ones((1, 3)))
    np.testing.assert_array_equal(calls[0].pos, [[0, 1, 2]])
    for k, call in enumerate(calls[1:], start=1):
        np.testing.assert_array_equal(call.ids, [[result.tokens[k - 1]]])
        np.testing.assert_array_equal(call.mask, np.ones((1, 3 + k)))
        np.testing.assert_array_equal(call.pos, [[2 + k]])
    # the loop's half of the array-reuse rule: one ids and one positions object, rewritten in place
    assert all(c.ids_obj is calls[1].ids_obj and c.pos_obj is calls[1].pos_obj for c in calls[1:])


def test_eos_finishes_the_row_and_stops_stepping(make):
    gen, fake = make(eos=9)
    result = gen.generate([6], max_new_tokens=10)
    assert result.tokens == [7, 8, 9] and result.finish_reason == "eos"
    assert result.text == text([7, 8])  # EOS is in the tokens, not in the text
    assert len(fake.calls) == 3
    fake.calls.clear()
    at_once = gen.generate([8], max_new_tokens=10)
    assert (at_once.tokens, at_once.finish_reason, at_once.text) == ([9], "eos", "")
    assert len(fake.calls) == 1  # the prefill only
    ignored = gen.generate([6], max_new_tokens=10, ignore_eos=True)
    assert ignored.tokens == successors(6, 10) and ignored.finish_reason == "length"
    assert CHARS[9] in ignored.text


def test_left_padded_batch_masks_and_positions(make):
    gen, fake = make(pad=12)
    prompts = [[1, 2, 3, 4], [7], [10, 11]]
    results = gen.generate(prompts, max_new_tokens=5)
    calls = list(fake.calls)
    assert [r.tokens for r in results] == [successors(p[-1], 5) for p in prompts]
    assert [r.tokens for r in results] == [gen.generate(p, max_new_tokens=5).tokens for p in prompts]
    assert [r.timings["prompt_tokens"] for r in results] == [4, 1, 2]
    assert len(calls) == 5
    np.testing.assert_array_equal(calls[0].ids, [[1, 2, 3, 4], [12, 12, 12, 7], [12, 12, 10, 11]])
    prefill_mask = np.array([[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(calls[0].mask, prefill_mask)
    np.testing.assert_array_equal(calls[0].pos, [[0, 1, 2, 3], [0, 0, 0, 0], [0, 0, 0, 1]])
    for k, call in enumerate(calls[1:], start=1):  # each row counts on from its own last position
        np.testing.assert_array_equal(call.pos, np.array([[4], [1], [2]]) + (k - 1))
        np.testing.assert_array_equal(call.mask, np.hstack([prefill_mask, np.ones((3, k), np.int64)]))
        np.testing.assert_array_equal(call.ids[:, 0], [r.tokens[k - 1] for r in results])
    assert all(c.ids_obj is calls[1].ids_obj and c.pos_obj is calls[1].pos_obj for c in calls[1:])


def test_a_row_ending_at_eos_leaves_the_others_running(make):
    gen, fake = make(eos=9)
    first, second = gen.generate([[6], [1, 0]], max_new_tokens=6)
    assert first.tokens == [7, 8, 9] and first.finish_reason == "eos"
    assert second.tokens == successors(0, 6) and second.finish_reason == "length"
    assert len(fake.calls) == 6
    fake.calls.clear()
    both = gen.generate([[6], [5, 7]], max_new_tokens=6)  # every row done: the loop stops early
    assert [r.tokens for r in both] == [[7, 8, 9], [8, 9]] and len(fake.calls) == 3


def test_stop_strings_cut_the_text(make):
    gen, _ = make()
    result = gen.generate("ab", max_new_tokens=10, stop="ef")
    assert result.finish_reason == "stop" and result.text == "cd"
    assert result.tokens == [2, 3, 4, 5]  # the stop string's tokens are kept
    assert gen.generate("ab", max_new_tokens=10, stop=["xyz", "de"]).text == "c"
    stream = gen.stream("ab", max_new_tokens=10, stop="ef")
    assert "".join(stream) == "cd" and stream.result.finish_reason == "stop"
    # half a stop string at the end of the budget is text, not a stop
    short = gen.generate("ab", max_new_tokens=3, stop="ef")
    assert (short.text, short.finish_reason) == ("cde", "length")
    assert "".join(gen.stream("ab", max_new_tokens=3, stop="ef")) == "cde"
    with pytest.raises(GenerationError, match="stop="):
        gen.generate("ab", stop=[""])


@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "seed": 3}, {"stop": "kl"}],
                         ids=["greedy", "sampled", "stop"])
def test_stream_yields_what_generate_returns(make, options):
    gen, _ = make(eos=13)
    result = gen.generate("ab", max_new_tokens=14, **options)
    stream = gen.stream("ab", max_new_tokens=14, **options)
    pieces = list(stream)
    assert "".join(pieces) == result.text and len(pieces) > 1
    assert stream.result.tokens == result.tokens
    assert stream.result.finish_reason == result.finish_reason


def test_closing_a_stream_stops_the_backend(make):
    gen, fake = make()
    stream = gen.stream([1], max_new_tokens=20)
    assert fake.calls == []  # nothing runs before the first piece is asked for
    next(stream), next(stream)
    stream.close()
    steps = len(fake.calls)
    assert steps < 5
    with pytest.raises(StopIteration):
        next(stream)
    assert len(fake.calls) == steps
    with pytest.raises(GenerationError, match="one prompt"):
        gen.stream([[1], [2]])


def test_context_room(make):
    gen, fake = make(max_context=24)
    prompt = [i % VOCAB for i in range(20)]
    with pytest.raises(GenerationError, match=r"20 tokens \+ max_new_tokens=5 .* 24 tokens.*truncate_prompt"):
        gen.generate(prompt, max_new_tokens=5)
    with pytest.raises(GenerationError, match="no room for a prompt"):
        gen.generate([1], max_new_tokens=24, truncate_prompt=True)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(GenerationError, match="max_new_tokens"):
            gen.generate([1], max_new_tokens=bad)
    with pytest.raises(GenerationError, match="non-empty"):
        gen.generate([])
    with pytest.raises(GenerationError, match="prompt is empty"):
        gen.generate([[1], []], max_new_tokens=2)
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        gen.generate([1, VOCAB])
    assert fake.calls == []  # every refusal comes before the backend runs
    cut = gen.generate(prompt, max_new_tokens=5, truncate_prompt=True)
    np.testing.assert_array_equal(fake.calls[0].ids, [prompt[-19:]])
    assert cut.tokens == successors(prompt[-1], 5)
    fake.calls.clear()
    full = gen.generate(prompt[:19], max_new_tokens=5)  # exactly the context
    assert len(full.tokens) == 5 and fake.calls[-1].mask.shape == (1, 23)


def test_seeded_sampling_is_reproducible(make):
    gen, _ = make()
    greedy = gen.generate([2], max_new_tokens=16).tokens
    first = gen.generate([2], max_new_tokens=16, temperature=1.0, seed=11).tokens
    assert gen.generate([2], max_new_tokens=16, temperature=1.0, seed=11).tokens == first
    assert gen.generate([2], max_new_tokens=16, temperature=1.0, seed=12).tokens != first
    assert first != greedy and all(0 <= t < VOCAB for t in first)
    batch = [[2], [5, 6]]
    runs = [[r.tokens for r in gen.generate(batch, max_new_tokens=8, temperature=1.5, seed=4)] for _ in range(2)]
    assert runs[0] == runs[1]
    # top_k=1 leaves one candidate, whatever the draw
    assert gen.generate([2], max_new_tokens=16, temperature=1.0, top_k=1, seed=5).tokens == greedy
    with pytest.raises(GenerationError, match="temperature"):
        gen.generate([2], temperature=-1.0)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("step", [0, 2], ids=["prefill", "decode"])
@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "seed": 0}], ids=["greedy", "sampled"])
def test_non_finite_logits_raise(make, value, step, options):
    gen, _ = make(poison={step: value})
    with pytest.raises(GenerationError, match="non-finite logits"):
        gen.generate([1], max_new_tokens=6, **options)


def test_a_closed_generator_refuses_work(make):
    gen, fake = make()
    assert gen.generate([1], max_new_tokens=2).tokens == [2, 3]
    gen.close()
    assert fake.closed == 1 and gen.backend_name == "fake"
    with pytest.raises(GenerationError, match="was closed"):
        gen.generate([1], max_new_tokens=2)
    with pytest.raises(GenerationError, match="was closed"):
        list(gen.stream([1], max_new_tokens=2))
    with pytest.raises(GenerationError, match="was closed"):
        gen.score([1, 2, 3])
    gen.close()  # twice is harmless and does not close the engine again
    assert fake.closed == 1
    with make()[0] as scoped:
        scoped.generate([1], max_new_tokens=1)
    with pytest.raises(GenerationError, match="was closed"):
        scoped.generate([1], max_new_tokens=1)


def test_score_is_the_log_softmax_of_full_logits(make):
    gen, _ = make()
    ids = [3, 4, 9, 10, 0]
    logits = fake_logits(np.array(ids[:-1]), np.arange(len(ids) - 1)).astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    want = log_probs[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(gen.score(ids), want, atol=1e-5)
    with pytest.raises(GenerationError, match="at least 2 tokens"):
        gen.score([3])


def test_a_session_feeds_only_the_new_tokens(make):
    gen, fake = make()
    session = gen.session()
    session.append([1, 2])
    assert session.generate(max_new_tokens=3).tokens == [3, 4, 5]
    session.append([9])
    second = session.generate(max_new_tokens=2)
    assert second.tokens == gen.generate([1, 2, 3, 4, 5, 9], max_new_tokens=2).tokens == [10, 11]
    turn = [c for c in fake.calls if c.state is fake.calls[0].state]
    assert [c.ids.tolist() for c in turn] == [[[1, 2]], [[3]], [[4]], [[5, 9]], [[10]]]
    assert [c.pos.tolist() for c in turn] == [[[0, 1]], [[2]], [[3]], [[4, 5]], [[6]]]
    assert [c.mask.shape[1] for c in turn] == [2, 3, 4, 6, 7]


TORCH_FREE = """
import json, pathlib, sys, tempfile
sys.path.insert(0, sys.argv[1])
import gptedge.runtime
from fake_backend import FakeBackend, fake_bundle
with tempfile.TemporaryDirectory() as folder:
    gen = gptedge.runtime.Generator(fake_bundle(pathlib.Path(folder), eos=9), FakeBackend())
    texts = [gen.generate("ab", max_new_tokens=4).text, "".join(gen.stream("ab", max_new_tokens=4)),
             *(r.text for r in gen.generate([[1], [2, 3]], max_new_tokens=3, temperature=1.0, top_k=1, seed=0))]
    gen.close()
print(json.dumps({"texts": texts, "loaded": sorted(m for m in ("torch", "tensorrt") if m in sys.modules)}))
"""


def test_the_loop_runs_without_torch():
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, str(TESTS)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["texts"] == ["cdef", "cdef", "cde", "efg"]
