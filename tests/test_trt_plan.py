"""`gptedge plan`: the memory arithmetic, usable memory per target, and the largest-context search."""

from __future__ import annotations

import pytest
from conftest import TINY_LLAMA
from onnx import TensorProto

from gptedge.runtime.cli import main
from gptedge.runtime.errors import EngineError, InputError
from gptedge.runtime.trt.plan import (
    GB,
    INT4_BLOCK,
    KV_BUFFERS,
    MB,
    TARGETS,
    WeightTensor,
    activation_bytes,
    describe_misfit,
    kv_bytes,
    plan_memory,
    weights_bytes,
)


def test_kv_bytes_arithmetic():
    # batch x context x layers x 2 (k, v) x kv_heads x head_dim x bytes, times the two ping-pong buffers
    assert kv_bytes(TINY_LLAMA, batch=3, context=10, kv_dtype="float32") == 3 * 10 * 2 * 2 * 2 * 8 * 4 * KV_BUFFERS
    assert kv_bytes(TINY_LLAMA, 3, 10, "float16") * 2 == kv_bytes(TINY_LLAMA, 3, 10, "float32")
    assert kv_bytes(TINY_LLAMA, 1, 10, "float32", buffers=1) == 10 * TINY_LLAMA.kv_bytes_per_token(4)


def test_weights_bytes_per_precision():
    inv = [WeightTensor("w", (64, 32), TensorProto.FLOAT), WeightTensor("b", (32,), TensorProto.FLOAT),
           WeightTensor("shape", (4,), TensorProto.INT64)]
    assert weights_bytes(inv) == (64 * 32 + 32) * 4 + 4 * 8
    assert weights_bytes(inv, "fp32") == (64 * 32 + 32) * 4 + 32
    assert weights_bytes(inv, "fp16") == (64 * 32 + 32) * 2 + 32
    assert weights_bytes(inv, "int8") == 64 * 32 + 32 * 4 + 32 * 2 + 32  # + one fp32 scale per output column
    assert weights_bytes(inv, "int4") == 64 * 32 // 2 + 64 * 32 // INT4_BLOCK * 2 + 32 * 2 + 32
    int4 = [WeightTensor("q", (64, 32), TensorProto.INT4)]
    assert weights_bytes(int4) == 1024


def test_activation_bytes_grows_quadratically_in_context():
    a1, a2 = (activation_bytes(TINY_LLAMA, 1, n, 4) for n in (16, 32))
    scores = lambda n: 2 * TINY_LLAMA.num_heads * n * n * 4  # noqa: E731
    assert a2 - 2 * a1 == scores(32) - 2 * scores(16) - TINY_LLAMA.vocab_size * 4
    assert activation_bytes(TINY_LLAMA, 1, 16, 4, full_logits=True) > a1


@pytest.mark.parametrize(("target", "memory", "usable_gb"), [
    ("jetson-orin-nano", None, 5.0), ("jetson-orin-nx", 8, 5.0), ("jetson-orin-nx", None, 13.0),
    ("jetson-orin-agx", 32, 29.0), ("desktop", 24, 23.0)])
def test_usable_memory(target, memory, usable_gb):
    assert TARGETS[target].usable_bytes(memory) == int(usable_gb * GB)


def test_jetson_memory_must_be_a_real_module_size():
    with pytest.raises(InputError, match="8 or 16"):
        TARGETS["jetson-orin-nx"].usable_bytes(12)


def test_plan_of_a_real_bundle(llama_bundle):
    plan = plan_memory(llama_bundle, "jetson-orin-nano", max_context=32, max_batch=2)
    assert plan.as_built == "fp32" and plan.fits()
    data = (llama_bundle / "model.onnx.data").stat().st_size
    fp32, fp16, int8, int4 = (plan.row(p).weights for p in ("fp32", "fp16", "int8", "int4"))
    assert data <= fp32 < data * 1.2  # external weights plus the small inline constants
    assert fp32 > fp16 > int8 > int4
    assert plan.row("fp32").kv == kv_bytes(TINY_LLAMA, 2, 32, "float32")
    assert all(r.largest_context == TINY_LLAMA.max_context for r in plan.rows)  # capped at the model's


def test_largest_context_is_the_boundary(llama_bundle):
    # 16 MB workspace + a tiny model on a "GPU" with ~16.2 MB usable: only part of the context fits
    memory_gb = 1.0 + (16 * MB + 150_000) / GB
    plan = plan_memory(llama_bundle, "desktop", workspace_mb=16, memory_gb=memory_gb)
    row = plan.row("fp32")
    n = row.largest_context
    assert 0 < n < TINY_LLAMA.max_context

    def total(ctx):
        return (row.weights + row.workspace + kv_bytes(TINY_LLAMA, 1, ctx, "float32")
                + activation_bytes(TINY_LLAMA, 1, ctx, 4))

    assert total(n) <= plan.usable < total(n + 1)
    assert not plan.fits()
    message = describe_misfit(plan)
    assert f"largest context that fits is {n}" in message and "GB usable" in message
    assert plan.row("int4").largest_context >= n


def test_bad_arguments(llama_bundle):
    with pytest.raises(InputError, match="max-context"):
        plan_memory(llama_bundle, "desktop", max_context=TINY_LLAMA.max_context + 1)
    with pytest.raises(InputError, match="target"):
        plan_memory(llama_bundle, "raspberry-pi")


def test_cli(llama_bundle, capsys):
    assert main(["plan", str(llama_bundle), "--target", "jetson-orin-nano", "--max-context", "32"]) == 0
    out = capsys.readouterr().out
    assert "Jetson Orin Nano" in out and "int4" in out and "fp32*" in out
    code = main(["plan", str(llama_bundle), "--target", "desktop", "--memory-gb", "1.01", "--workspace", "16"])
    assert code == EngineError.exit_code
    assert "largest context" in capsys.readouterr().err
