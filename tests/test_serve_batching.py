"""Continuous batching (the scheduler driven step by step, no thread): requests joining and leaving
a running batch at step boundaries get exactly the tokens `Generator.generate` gives each alone."""

from __future__ import annotations

import pytest
from serve_helpers import chat_bundle

from gptedge.runtime import load
from gptedge.runtime.sampling import SamplingOptions
from gptedge.runtime.serve.scheduler import Job, QueueFullError, Scheduler, Update, batching_caveat

# (prompt ids, max new tokens, ignore_eos, temperature, seed): different lengths so rows are ragged
REQUESTS = [
    ([5, 9, 14, 30, 31, 40, 41, 42, 60, 61, 70], 20, True, 0.0, None),
    ([12, 13], 9, True, 0.0, None),
    ([50, 51, 52, 53, 54], 30, True, 0.0, None),
    ([7], 14, True, 0.0, None),
    ([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42], 12, False,
     0.0, None),
    ([8, 16, 24], 16, True, 0.9, 1234),  # sampled: same seed, same draws, same tokens
    ([90, 91, 92, 93], 25, False, 0.0, None),
    ([8, 9, 10], 80, True, 0.0, None),  # outgrows the variant batch's first buffers (64 columns)
]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    gen = load(chat_bundle(tmp_path_factory), backend="ort-cpu")
    yield gen
    gen.close()


def _options(max_new, ignore_eos, temperature, seed) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=max_new, ignore_eos=ignore_eos, temperature=temperature, seed=seed)


@pytest.fixture(scope="module")
def alone(generator):
    return [generator.generate(ids, options=_options(*rest)) for ids, *rest in REQUESTS]


def _run(generator, arrivals: dict[int, list[int]], max_batch: int, cancel: dict[int, int] | None = None,
         portable: bool = False):
    """Submit request i at the step boundary arrivals says; returns each request's tokens and the
    largest batch seen."""
    scheduler = Scheduler(generator, max_batch=max_batch, max_queue=len(REQUESTS), portable_batch=portable)
    assert type(scheduler.batch).__name__ == ("PaddedBatch" if portable else "VariantBatch")
    updates: dict[int, list[Update]] = {}
    jobs: dict[int, Job] = {}
    step, widest = 0, 0
    while len(jobs) < sum(map(len, arrivals.values())) or not all(j.done or j.cancelled for j in jobs.values()):
        for i in arrivals.get(step, []):
            updates[i] = []
            jobs[i] = Job(REQUESTS[i][0], _options(*REQUESTS[i][1:]), updates[i].append)
            scheduler.submit(jobs[i])
        for i, at in (cancel or {}).items():
            if at == step:
                jobs[i].cancel()
        scheduler.step()
        widest = max(widest, scheduler.running)
        step += 1
        assert step < 500
    scheduler.step()  # the last rows leave
    assert scheduler.running == 0 and scheduler.batch.state is None
    tokens = {i: [t for u in ups for t in u.tokens] for i, ups in updates.items()}
    assert all(u.error is None for ups in updates.values() for u in ups)
    return tokens, widest, updates


@pytest.mark.parametrize("arrivals,max_batch", [
    ({0: list(range(len(REQUESTS)))}, 8),                      # all at once
    ({0: [2], 1: [0, 4], 3: [1, 7], 4: [6, 3], 9: [5]}, 8),     # staggered: rows join a running batch
    ({0: [7, 6, 5, 4, 3, 2, 1, 0]}, 3),                         # reversed, queued: rows leave, others join
    ({i * 2: [i] for i in range(len(REQUESTS))}, 2),
])
@pytest.mark.parametrize("portable", [False, True], ids=["variant", "portable"])
def test_batching_never_changes_a_result(generator, alone, arrivals, max_batch, portable):
    tokens, widest, updates = _run(generator, arrivals, max_batch, portable=portable)
    assert widest >= min(max_batch, 6)  # rows really ran together
    for i, want in enumerate(alone):
        assert tokens[i] == want.tokens, f"request {i} differs when batched (arrivals {arrivals})"
        last = updates[i][-1]
        assert last.finish_reason == ("length" if want.finish_reason == "length" else "stop")
        assert last.completion_tokens == len(want.tokens)
        assert "".join(u.text for u in updates[i]) == want.text


@pytest.mark.parametrize("portable", [False, True], ids=["variant", "portable"])
def test_cancelled_row_leaves_at_the_next_boundary(generator, alone, portable):
    tokens, _, _ = _run(generator, {0: [0, 2, 3]}, 8, cancel={2: 4}, portable=portable)
    assert len(tokens[2]) == 4 + 1  # prefill's token + 4 decode steps, then the row left
    assert tokens[0] == alone[0].tokens and tokens[3] == alone[3].tokens


def test_full_queue_is_refused_with_retry_after(generator):
    for max_queue in (2, 0):
        scheduler = Scheduler(generator, max_batch=1, max_queue=max_queue)
        for _ in range(1 + max_queue):  # the free row, then the queue
            scheduler.submit(Job([5, 6], _options(4, True, 0.0, None), lambda u: None))
        with pytest.raises(QueueFullError, match="--max-queue") as info:
            scheduler.submit(Job([5, 6], _options(4, True, 0.0, None), lambda u: None))
        assert info.value.retry_after >= 1


@pytest.fixture(scope="module")
def int8_generator(tmp_path_factory):
    from gptedge.quantize import Int8DynamicConfig, quantize

    out = tmp_path_factory.mktemp("serve-int8") / "int8"
    quantize(chat_bundle(tmp_path_factory), Int8DynamicConfig(), out, max_ppl_increase=float("inf"))
    gen = load(out, backend="ort-cpu")
    yield gen
    gen.close()


def test_int8_batching_never_changes_a_result(int8_generator):
    """int8 MatMulNBits (accuracy level 4) quantizes each row's activations on its own, so on the
    per-row-length batch a row's tokens do not depend on its neighbours (a per-tensor activation
    scale, ``Int8DynamicConfig(kernel="matmulinteger")``, fails this)."""
    alone = [int8_generator.generate(ids, options=_options(*rest)) for ids, *rest in REQUESTS]
    tokens, widest, _ = _run(int8_generator, {0: [2], 1: [0, 4], 3: [1, 7], 4: [6, 3], 9: [5]}, 8)
    assert widest >= 6
    assert [tokens[i] for i in range(len(REQUESTS))] == [want.tokens for want in alone]
    precision = int8_generator.bundle.manifest.precision
    assert batching_caveat(precision, ragged=True) is None  # the server says nothing here
    assert "padded portable batch" in batching_caveat(precision, ragged=False)
