"""The parity criterion separates float32 noise from bugs: graph vs the source in float64.

Each failing case runs the library's own check on a graph/reference pair with one real defect:
a weight off by 0.1 %, RoPE halves swapped, positions off by one.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_GPT2, TINY_LLAMA
from onnx import numpy_helper

import gptedge.exporter.model as decoder_module
from gptedge.exporter.checkpoints.synthetic import random_checkpoint
from gptedge.exporter.pipeline import build_decoder
from gptedge.exporter.validate import check_parity
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.errors import ParityError


def source_decoder(arch):
    """The float32 torch decoder the bundle of ``bundle_factory(arch)`` was exported from."""
    return build_decoder(arch, random_checkpoint(arch, 0).state_dict, "random").eval()


@pytest.mark.parametrize("arch", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_exports_pass_with_every_figure_in_the_manifest(bundle_factory, arch):
    parity = load_bundle(bundle_factory(arch)).manifest.parity
    assert parity["passed"] and parity["top1_agreement"] == 1.0
    assert set(parity["outputs"]) == {"logits", *(f"present.{i}.{k}" for i in range(2) for k in ("key", "value"))}
    for name, figures in parity["outputs"].items():
        assert figures["max_abs"] <= figures["allowed"] == pytest.approx(
            parity["noise_ratio"] * figures["fp32_max_abs"] + parity["noise_floor"]), name
    assert parity["outputs"]["logits"]["top1_positions"] == 7 + 4 + 2 * 4


def test_a_weight_off_by_a_thousandth_fails(bundle_factory, tmp_path):
    model = onnx.load(str(bundle_factory(TINY_LLAMA) / "model.onnx"))
    weights = [w for w in model.graph.initializer if w.name.startswith("layers.1.") and len(w.dims) == 2]
    changed = numpy_helper.to_array(weights[0]) * np.float32(1.001)
    weights[0].CopyFrom(numpy_helper.from_array(changed, weights[0].name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(ParityError, match="outputs exceed float32 noise") as failure:
        check_parity(tmp_path, source_decoder(TINY_LLAMA), TINY_LLAMA)
    assert "logits (max-abs" in str(failure.value)


def test_swapped_rope_halves_fail(bundle_factory, tmp_path, monkeypatch):
    def swapped_rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((x[..., half:], -x[..., :half]), dim=-1)

    shutil.copytree(bundle_factory(TINY_LLAMA), tmp_path / "b")
    monkeypatch.setattr(decoder_module, "rotate_half", swapped_rotate_half)  # the reference's rotary only
    with pytest.raises(ParityError, match=r"present\.0\.key"):
        check_parity(tmp_path / "b", source_decoder(TINY_LLAMA), TINY_LLAMA)


class PositionsOffByOne(torch.nn.Module):
    """The source model given every position + 1, i.e. the graph sees positions one too low."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids, past):
        return self.inner(input_ids, attention_mask, position_ids + 1, past)


def test_positions_off_by_one_fail(bundle_factory):
    with pytest.raises(ParityError, match=r"present\.1\.key") as failure:
        check_parity(bundle_factory(TINY_LLAMA), PositionsOffByOne(source_decoder(TINY_LLAMA)), TINY_LLAMA)
    assert "present.0.value" not in str(failure.value)  # values carry no position: noise only


@pytest.mark.parametrize("arch", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_float64_pass_equals_a_float64_copy_without_making_one(arch, monkeypatch):
    """The reference's float64 pass converts weights a slice at a time (the export's peak memory):
    its outputs are a float64 copy's, and the LM head and the token table stay float32 throughout."""
    import copy

    from gptedge.exporter import validate

    monkeypatch.setattr(validate, "FLOAT64_CHUNK", 64)  # several row blocks even on a tiny head
    decoder = source_decoder(arch)
    ids, mask, positions = validate.parity_inputs(arch)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    past = {f"past_key_values.{i}.{k}": np.zeros((2, arch.num_kv_heads, 0, arch.head_dim), np.float32)
            for i in range(arch.num_layers) for k in ("key", "value")}
    want = validate._torch_outputs(copy.deepcopy(decoder).double(), feeds, past, arch, torch.float64)
    seen = []
    for module in (decoder.embed, decoder.lm_head):
        module.register_forward_hook(lambda m, args, out: seen.append((m.weight.dtype, out.dtype)))
    with validate._float64_one_module_at_a_time(decoder):
        got = validate._torch_outputs(decoder, feeds, past, arch, torch.float64)
    assert seen == [(torch.float32, torch.float64)] * 2
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-12, atol=1e-12, err_msg=name)
    assert all(p.dtype == torch.float32 for p in decoder.parameters()) and "forward" not in vars(decoder.lm_head)
