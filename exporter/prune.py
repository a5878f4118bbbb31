"""Pruning the torch decoder before export, with the selection rules of ``gptedge.quantize.prune``.

The ONNX-side pruner (``gptedge quantize --mode prune``) works one-shot on a bundle; this one works
on the :class:`~gptedge.exporter.model.Decoder` so a recovery fine-tune (:mod:`.finetune`) can
follow. The rules are the same, re-stated in torch because ``gptedge.quantize`` never imports
torch and the exporter never imports ``gptedge.quantize``: only the transformer blocks' linear
layers are pruned (the LM head and embeddings stay dense); scores are |W| (no activation
statistics here), computed in the ONNX ``[in, out]`` orientation so ties fall the same way.

- ``magnitude``: the ``sparsity`` fraction of smallest |W| of every matrix is zeroed.
- ``2:4``: in every group of 4 consecutive inputs of an output, the 2 smallest are zeroed.
- ``structured``: whole MLP neurons are removed (rows of up/gate_up, columns of down), scored by
  ||down column|| * ||up row|| (* ||gate row||); ``intermediate_size`` shrinks.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from gptedge.exporter.model import Decoder

PRUNE_METHODS = ("magnitude", "2:4", "structured")
_PRUNABLE = re.compile(r"^layers\.\d+\.(attn\.(qkv|out)|mlp\.(up|gate_up|down))\.weight$")


def prunable_weights(decoder: Decoder) -> dict[str, torch.nn.Parameter]:
    """The block linear weights ``[out, in]`` that unstructured and 2:4 pruning touch, by name."""
    return {name: p for name, p in decoder.named_parameters() if _PRUNABLE.match(name)}


def keep_mask(weight: torch.Tensor, method: str, sparsity: float) -> torch.Tensor:
    """Boolean mask ``[out, in]`` of the entries of ``weight`` (``[out, in]``) that survive."""
    score = weight.detach().abs().t().contiguous()  # [in, out], as gptedge.quantize.prune sees it
    keep = torch.ones(score.shape, dtype=torch.bool)
    if method == "magnitude":
        k = int(round(score.numel() * sparsity))
        if k:
            keep.view(-1)[torch.argsort(score.view(-1), stable=True)[:k]] = False
    elif method == "2:4":
        rows = score.shape[0] - score.shape[0] % 4
        groups = score[:rows].reshape(rows // 4, 4, -1)
        low = torch.argsort(groups, dim=1, stable=True)[:, :2, :]
        group_keep = torch.ones(groups.shape, dtype=torch.bool).scatter_(1, low, False)
        keep[:rows] = group_keep.reshape(rows, -1)
    else:
        raise ValueError(f"no unstructured rule for {method!r}")
    return keep.t().contiguous()


@torch.no_grad()
def apply_masks(decoder: Decoder, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked-out weights again (after every optimizer step of the fine-tune)."""
    params = dict(decoder.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def prune_unstructured(decoder: Decoder, method: str, sparsity: float) -> dict[str, torch.Tensor]:
    """Prune ``decoder`` in place; returns the masks (name -> bool ``[out, in]``) to hold fixed."""
    masks = {name: keep_mask(p, method, sparsity) for name, p in prunable_weights(decoder).items()}
    apply_masks(decoder, masks)
    return masks


def kept_neurons(mlp: torch.nn.Module, width: int, keep_count: int) -> torch.Tensor:
    """Sorted indices of the ``keep_count`` MLP neurons with the highest weight score."""
    score = torch.linalg.vector_norm(mlp.down.weight, dim=0)  # [I]: what each neuron feeds out
    up = mlp.gate_up.weight if hasattr(mlp, "gate_up") else mlp.up.weight
    for part in up.split(width, dim=0):  # gate rows, then up rows (one part for GELU MLPs)
        score = score * torch.linalg.vector_norm(part, dim=1)
    return torch.sort(torch.argsort(-score, stable=True)[:keep_count]).values


@torch.no_grad()
def prune_mlp_neurons(decoder: Decoder, sparsity: float) -> Decoder:
    """A new, smaller decoder without the ``sparsity`` fraction of every layer's MLP neurons."""
    from gptedge.exporter.export import build_decoder  # export.py imports this module lazily too

    arch = decoder.arch
    width = arch.intermediate_size
    keep_count = max(1, width - int(round(width * sparsity)))
    state = dict(decoder.state_dict())
    for index, layer in enumerate(decoder.layers):
        keep = kept_neurons(layer.mlp, width, keep_count)
        prefix = f"layers.{index}.mlp."
        gated = f"{prefix}gate_up.weight" in state
        up = prefix + ("gate_up" if gated else "up")
        rows = torch.cat([keep, keep + width]) if gated else keep
        state[f"{up}.weight"] = state[f"{up}.weight"][rows]
        if f"{up}.bias" in state:
            state[f"{up}.bias"] = state[f"{up}.bias"][rows]
        state[f"{prefix}down.weight"] = state[f"{prefix}down.weight"][:, keep]
    smaller = dataclasses.replace(arch, intermediate_size=keep_count)
    state = {k: v.clone() for k, v in state.items()}  # fresh storage: the fine-tune edits it in place
    return build_decoder(smaller, state, "pruned decoder")


def reached_sparsity(decoder: Decoder, method: str, dense_width: int) -> float:
    """The fraction actually removed: zeros among the prunable weights, or neurons dropped."""
    if method == "structured":
        return 1.0 - decoder.arch.intermediate_size / dense_width
    weights = list(prunable_weights(decoder).values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)
