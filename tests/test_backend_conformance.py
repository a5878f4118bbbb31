"""One set of checks every Backend must pass (gptedge.runtime.backend.Backend), run on each backend
this machine can run: the fake of the loop tests, onnxruntime on the portable graph, onnxruntime on
its in-place variant (model_ort, the backend that keeps reused arrays bound), and TensorRT when
tensorrt and a built engine are present. TensorRT's class and its refusal without tensorrt are
checked everywhere."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import TINY_LLAMA
from fake_backend import FakeBackend, fake_bundle

from gptedge.runtime import Generator
from gptedge.runtime.backend import REGISTRY, Backend, availability, create_backend
from gptedge.runtime.bundle import Bundle, load_bundle
from gptedge.runtime.errors import BackendUnavailableError, GenerationError
from gptedge.runtime.ort.backend import OrtBackend
from gptedge.runtime.trt.backend import NOT_INSTALLED, TrtBackend

# head_dim 16: the smallest the GroupQueryAttention CPU kernel of model_ort.onnx takes
GQA_LLAMA = dataclasses.replace(TINY_LLAMA, hidden_size=48, num_heads=3, num_kv_heads=1, head_dim=16)
ATOL = 1e-4  # fp32 max-abs between two evaluations of one graph (DESIGN: tolerances)
PROTOCOL_METHODS = ("new_state", "step", "full_logits", "close")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@dataclass
class Case:
    backend: Backend
    bundle: Bundle
    vocab: int


@pytest.fixture(params=["fake", "ort-cpu", "ort-cpu-variant", "tensorrt"])
def case(request, tmp_path):
    name = request.param
    if name == "fake":
        backend: Backend = FakeBackend()
        bundle = fake_bundle(tmp_path / "fake")
    elif name == "tensorrt":
        bundle = load_bundle(request.getfixturevalue("llama_bundle"))
        try:
            backend = create_backend("tensorrt", bundle)
        except BackendUnavailableError as exc:
            pytest.skip(f"the TensorRT backend cannot run here: {exc}")
    else:
        arch = GQA_LLAMA if name.endswith("variant") else TINY_LLAMA
        bundle = load_bundle(request.getfixturevalue("bundle_factory")(arch))
        backend = OrtBackend(bundle, threads=1)
        if backend.has_variant != name.endswith("variant"):
            pytest.skip(f"{name}: this onnxruntime runs {backend.model_path.name} for this bundle")
    yield Case(backend, bundle, bundle.manifest.architecture.vocab_size)
    backend.close()


def feeds(ids: np.ndarray, past: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh (input_ids, attention_mask, position_ids) for ``ids [B, S]`` after ``past`` tokens, no padding."""
    batch, seq = ids.shape
    positions = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
    return np.ascontiguousarray(ids, dtype=np.int64), np.ones((batch, past + seq), np.int64), positions


def reference(case: Case, ids: np.ndarray) -> np.ndarray:
    """Logits of every position of ``ids [B, T]`` from an empty cache (``full_logits``)."""
    return case.backend.full_logits(*feeds(ids))


def signature(function) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


# -- the declared interface ---------------------------------------------------------------------
@pytest.mark.parametrize("cls", [FakeBackend, OrtBackend, TrtBackend], ids=["fake", "ort", "tensorrt"])
def test_classes_declare_the_protocol_methods(cls):
    for method in PROTOCOL_METHODS:
        assert signature(getattr(cls, method)) == signature(getattr(Backend, method)), (cls.__name__, method)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registered_factories_and_probes(name):
    module_name, factory, probe = REGISTRY[name]
    module = importlib.import_module(module_name)
    assert [p[0] for p in signature(getattr(module, factory))] == ["bundle", "threads"]
    assert [p[0] for p in signature(getattr(module, probe))] == ["bundle"]


def test_instances_are_backends(case):
    assert isinstance(case.backend, Backend)
    assert isinstance(case.backend.name, str) and case.backend.name
    if case.backend.name in REGISTRY:  # what runs here is what the registry says can run here
        assert availability(case.backend.name, case.bundle) is None


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here: the refusal cannot be checked")
def test_tensorrt_refuses_cleanly_without_tensorrt(llama_bundle):
    bundle = load_bundle(llama_bundle)
    assert availability("tensorrt", bundle) == NOT_INSTALLED
    with pytest.raises(BackendUnavailableError, match="tensorrt is not installed"):
        create_backend("tensorrt", bundle)
    with pytest.raises(BackendUnavailableError, match="tensorrt"):  # the class itself, not only the registry
        TrtBackend(bundle)
    assert create_backend("auto", bundle).name.startswith("ort")


# -- what step / full_logits return -------------------------------------------------------------
def test_outputs_follow_the_contract(case):
    ids = np.random.default_rng(0).integers(0, case.vocab, (2, 6), dtype=np.int64)
    full = reference(case, ids)
    assert full.shape == (2, 6, case.vocab) and full.dtype == np.float32 and np.isfinite(full).all()
    state = case.backend.new_state(2)
    rows = [case.backend.step(state, *feeds(ids[:, :4])).copy()]
    rows += [case.backend.step(state, *feeds(ids[:, t:t + 1], past=t)).copy() for t in (4, 5)]
    for got in rows:
        assert got.shape == (2, case.vocab) and got.dtype == np.float32
    # step returns the LAST position's logits: prefill + incremental decode == full logits
    np.testing.assert_allclose(np.stack(rows, axis=1), full[:, 3:], atol=ATOL)


def test_new_state_is_empty_and_states_are_independent(case):
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, case.vocab, (1, 5), dtype=np.int64) for _ in range(2))
    used = case.backend.new_state(1)
    for t in range(5):
        case.backend.step(used, *feeds(a[:, t:t + 1], past=t))
    first, second = case.backend.new_state(1), case.backend.new_state(1)
    got: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for t in range(5):  # two fresh states, stepped in turns
        for key, state, ids in ((0, first, a), (1, second, b)):
            got[key].append(case.backend.step(state, *feeds(ids[:, t:t + 1], past=t)).copy())
    for key, ids in ((0, a), (1, b)):
        np.testing.assert_allclose(np.stack(got[key], axis=1), reference(case, ids), atol=ATOL)


def test_inputs_are_not_modified(case):
    ids = np.random.default_rng(2).integers(0, case.vocab, (1, 4), dtype=np.int64)
    state = case.backend.new_state(1)
    for arrays in (feeds(ids[:, :3]), feeds(ids[:, 3:], past=3)):
        before = [a.copy() for a in arrays]
        case.backend.step(state, *arrays)
        for was, now in zip(before, arrays):
            np.testing.assert_array_equal(was, now)
    arrays = feeds(ids)
    before = [a.copy() for a in arrays]
    case.backend.full_logits(*arrays)
    for was, now in zip(before, arrays):
        np.testing.assert_array_equal(was, now)


def test_logits_stay_valid_until_that_states_next_step(case):
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, case.vocab, (1, 3), dtype=np.int64) for _ in range(2))
    first, second = case.backend.new_state(1), case.backend.new_state(1)
    kept = case.backend.step(first, *feeds(a))  # no copy: valid until `first` steps again
    saved = kept.copy()
    case.backend.step(second, *feeds(b))
    case.backend.step(second, *feeds(b[:, :1], past=3))
    np.testing.assert_array_equal(kept, saved)


def test_a_mask_that_disagrees_with_the_cache_is_refused(case):
    state = case.backend.new_state(1)
    ids, _mask, positions = feeds(np.array([[1, 2]]))
    with pytest.raises(GenerationError):
        case.backend.step(state, ids, np.ones((1, 3), np.int64), positions)
    state = case.backend.new_state(1)
    case.backend.step(state, *feeds(np.array([[1, 2, 3]])))
    with pytest.raises(GenerationError):  # past 3 + 1 new token needs 4 mask columns
        case.backend.step(state, np.array([[4]]), np.ones((1, 3), np.int64), np.array([[3]]))


# -- the array-reuse rule -----------------------------------------------------------------------
def test_reused_arrays_rewritten_in_place_give_the_new_results(case):
    """As the generate loop does: the SAME one-token ids/positions arrays every step, rewritten in
    place, also across states and around multi-token steps; every result must follow the new
    contents (identity may skip a rebind, never the read)."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, case.vocab, 16, dtype=np.int64)
    while (tokens[1:] == tokens[:-1]).any():  # consecutive steps always change the token
        tokens = rng.integers(0, case.vocab, 16, dtype=np.int64)
    full = reference(case, tokens[None, :12])[0]
    ids, positions, mask = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64), np.ones((1, 16), np.int64)
    state = case.backend.new_state(1)
    case.backend.step(state, *feeds(tokens[None, :4]))

    def one(state, token: int, position: int) -> np.ndarray:
        ids[0, 0], positions[0, 0] = token, position
        return case.backend.step(state, ids, mask[:, :position + 1], positions)[0].copy()

    got = [one(state, tokens[t], t) for t in range(4, 8)]
    np.testing.assert_allclose(np.stack(got), full[4:8], atol=ATOL)
    other = case.backend.new_state(1)  # the same arrays handed to another state
    case.backend.step(other, *feeds(tokens[None, 12:14]))
    np.testing.assert_allclose(one(other, tokens[14], 2), reference(case, tokens[None, 12:15])[0, -1], atol=ATOL)
    np.testing.assert_allclose(one(state, tokens[8], 8), full[8], atol=ATOL)
    chunk = case.backend.step(state, *feeds(tokens[None, 9:11], past=9))  # a fresh two-token step in between
    np.testing.assert_allclose(chunk, full[10:11], atol=ATOL)
    np.testing.assert_allclose(one(state, tokens[11], 11), full[11], atol=ATOL)


def test_reused_arrays_give_what_fresh_arrays_with_the_same_contents_give(case):
    """Positions are the caller's to choose (the graph takes them as given). When they stop
    following the cache length after a first step, the reused arrays must give what fresh arrays
    with the same contents give: a backend may skip rebinding known arrays, not re-reading them."""
    prompt = np.array([[5, 9]], dtype=np.int64)
    steps = [(7, 2), (1, 4), (11, 5)]  # (token, position): from the second step on, ahead of the cache
    fresh_state, reused_state = case.backend.new_state(1), case.backend.new_state(1)
    ids, positions = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
    for state in (fresh_state, reused_state):
        case.backend.step(state, *feeds(prompt))
    for past, (token, position) in enumerate(steps, start=2):
        mask = np.ones((1, past + 1), np.int64)
        want = case.backend.step(fresh_state, np.array([[token]]), mask, np.array([[position]])).copy()
        ids[0, 0], positions[0, 0] = token, position
        got = case.backend.step(reused_state, ids, mask, positions)
        np.testing.assert_allclose(got, want, atol=ATOL)


# -- close ----------------------------------------------------------------------------------------
def test_close_through_the_generator(case):
    """Generator.close closes the backend once; later calls raise GenerationError, a second close is harmless."""
    generator = Generator(case.bundle, case.backend)
    assert len(generator.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True).tokens) == 3
    generator.close()
    with pytest.raises(GenerationError, match="was closed"):
        generator.generate([1, 2, 3], max_new_tokens=3)
    generator.close()
