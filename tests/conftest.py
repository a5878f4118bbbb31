"""Shared fixtures: tiny architectures and bundles exported from random weights (fixed seeds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gptedge.runtime.bundle import Architecture

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_GPT2 = Architecture(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                         intermediate_size=128, max_context=64, norm="layernorm", norm_eps=1e-5,
                         position="learned", activation="gelu_tanh", tie_word_embeddings=True)
TINY_LLAMA = Architecture(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          intermediate_size=64, max_context=64, norm="rmsnorm", norm_eps=1e-6, norm_bias=False,
                          position="rope", rope_theta=10000.0, activation="swiglu", qkv_bias=False,
                          attn_out_bias=False, mlp_bias=False, tie_word_embeddings=False)


def shared_file(*parts: str) -> Path:
    """A file from ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not present (the ../shared/data folder is beside the checkout only in our workspace)")
    return path


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """Export a random-weight checkpoint of ``arch`` once per (arch, seed) and return the bundle path."""
    from gptedge.exporter import ExportConfig, export_loaded
    from gptedge.exporter.checkpoints.synthetic import random_checkpoint

    cache: dict[tuple, Path] = {}

    def make(arch: Architecture = TINY_LLAMA, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp("bundle") / "b"
            export_loaded(random_checkpoint(arch, seed), ExportConfig(), out)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_bundle(bundle_factory) -> Path:
    return bundle_factory(TINY_LLAMA)


@pytest.fixture(scope="session")
def gpt2_bundle(bundle_factory) -> Path:
    return bundle_factory(TINY_GPT2)


# Whole modules that train models, run the demo and the examples, drive peer clients (Optimum,
# onnxruntime-genai) or score quality gates: minutes together. `pytest` alone skips them (and every
# test marked slow); `pytest --run-slow`, what CI runs, runs everything.
SLOW_MODULES = frozenset({"test_demo", "test_train", "test_prune_finetune", "test_examples", "test_hf_clients",
                          "test_peers_quick", "test_quantize_prune_gate", "test_serve_http", "test_serve_cli",
                          "test_triton", "test_evaluate_chunks", "test_bundle_writer"})


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow (CI does)")
    for item in items:
        if item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if not config.getoption("--run-slow") and item.get_closest_marker("slow"):
            item.add_marker(skip_slow)
