"""Pruning the torch decoder before export, with the selection rules of ``gptedge.quantize.prune``.

The ONNX-side pruner (``gptedge quantize --mode prune``) works one-shot on a bundle; this one works
on the :class:`~gptedge.exporter.model.Decoder` so a recovery fine-tune (:mod:`.finetune`) can
follow. Which weights and neurons go is decided by the same numpy functions
(:func:`gptedge.quantize.prune.keep_mask`, :func:`~gptedge.quantize.prune.kept_neurons`), fed the
weights in the ONNX ``[in, out]`` orientation so ties fall the same way; only applying the result to
the torch modules lives here. Only the transformer blocks' linear layers are pruned (the LM head and
embeddings stay dense); scores are |W| (no activation statistics here).

- ``magnitude``: the ``sparsity`` fraction of smallest |W| of every matrix is zeroed.
- ``2:4``: in every group of 4 consecutive inputs of an output, the 2 smallest are zeroed.
- ``structured``: whole MLP neurons are removed (rows of up/gate_up, columns of down), scored by
  ||down column|| * ||up row|| (* ||gate row||); ``intermediate_size`` shrinks. With a heads
  fraction, whole attention heads go too (:func:`prune_attention_heads`, exporter-only): the same
  count in every layer, so ``num_heads`` (and with multi-head attention ``num_kv_heads``) shrink.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch

from gptedge.exporter.model import MLP, Attention, Decoder
from gptedge.quantize import prune as rules
from gptedge.runtime.errors import UnsupportedModelError

PRUNE_METHODS = ("magnitude", "2:4", "structured")
_PRUNABLE = re.compile(r"^layers\.\d+\.(attn\.(qkv|out)|mlp\.(up|gate_up|down))\.weight$")


def prunable_weights(decoder: Decoder) -> dict[str, torch.nn.Parameter]:
    """The block linear weights ``[out, in]`` that unstructured and 2:4 pruning touch, by name."""
    return {name: p for name, p in decoder.named_parameters() if _PRUNABLE.match(name)}


def keep_mask(weight: torch.Tensor, method: str, sparsity: float) -> torch.Tensor:
    """Boolean mask ``[out, in]`` of the entries of ``weight`` (``[out, in]``) that survive."""
    keep = rules.keep_mask(weight.detach().t().numpy(), method, sparsity)  # [in, out], as in the graph
    return torch.from_numpy(np.ascontiguousarray(keep.T))


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


def kept_neurons(mlp: MLP, width: int, keep_count: int) -> torch.Tensor:
    """Sorted indices of the ``keep_count`` MLP neurons with the highest weight score."""
    down = mlp.down.weight.detach().t().numpy()  # [I, H]: what each neuron feeds out
    up = (mlp.gate_up.weight if hasattr(mlp, "gate_up") else mlp.up.weight).detach().t().numpy()
    parts = [up[:, start:start + width] for start in range(0, up.shape[1], width)]  # gate, then up
    return torch.from_numpy(rules.kept_neurons(down, parts, keep_count).astype(np.int64))


@torch.no_grad()
def prune_mlp_neurons(decoder: Decoder, sparsity: float) -> Decoder:
    """A new, smaller decoder without the ``sparsity`` fraction of every layer's MLP neurons."""
    from gptedge.exporter.pipeline import build_decoder  # pipeline.py imports this module lazily too

    arch = decoder.arch
    width = arch.intermediate_size
    keep_count = rules.neuron_keep_count(width, sparsity)
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


def _head_rows(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """Row (or column) indices of whole heads in a ``[heads * head_dim, ...]`` matrix."""
    return (offset + heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def kept_heads(attn: Attention, keep_kv: int, keep_per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, kv heads) to keep, sorted. Query heads score ||their out columns|| * ||their q
    rows||; a kv head (with multi-head attention: a head's own k/v) scores its group's sum."""
    H, K, D = attn.n_head, attn.n_kv, attn.head_dim
    group = H // K
    out_cols = torch.linalg.vector_norm(attn.out.weight.reshape(-1, H, D), dim=(0, 2))  # [H]
    q_rows = torch.linalg.vector_norm(attn.qkv.weight[: H * D].reshape(H, D, -1), dim=(1, 2))
    score = (out_cols * q_rows).reshape(K, group)
    kv = torch.sort(torch.argsort(-score.sum(dim=1), stable=True)[:keep_kv]).values
    within = torch.sort(torch.argsort(-score[kv], dim=1, stable=True)[:, :keep_per_group], dim=1).values
    return (kv[:, None] * group + within).reshape(-1), kv


@torch.no_grad()
def prune_attention_heads(decoder: Decoder, fraction: float) -> Decoder:
    """A new decoder without ``fraction`` of every layer's attention heads (the same heads count in
    every layer). Multi-head attention drops whole heads (q, k, v and out columns); grouped-query
    attention keeps every kv head and drops query heads inside each group, so the grouping stays."""
    from gptedge.exporter.pipeline import build_decoder

    arch = decoder.arch
    if arch.position == "alibi" or arch.qk_norm == "per_head":
        # ALiBi's slopes and Cohere's per-head q/k norm weights belong to head indices
        raise UnsupportedModelError(f"pruning attention heads of a model with position={arch.position!r}, "
                                    f"qk_norm={arch.qk_norm!r} is not supported; prune MLP neurons only")
    H, K, D = arch.num_heads, arch.num_kv_heads, arch.head_dim
    group = H // K
    if group == 1:
        keep_kv, keep_group = max(1, K - int(round(K * fraction))), 1
    else:
        keep_kv, keep_group = K, max(1, group - int(round(group * fraction)))
    state = dict(decoder.state_dict())
    for index, layer in enumerate(decoder.layers):
        q_heads, kv_heads = kept_heads(layer.attn, keep_kv, keep_group)
        rows = torch.cat([_head_rows(q_heads, D), _head_rows(kv_heads, D, H * D),
                          _head_rows(kv_heads, D, (H + K) * D)])
        prefix = f"layers.{index}.attn."
        state[prefix + "qkv.weight"] = state[prefix + "qkv.weight"][rows]
        if prefix + "qkv.bias" in state:
            state[prefix + "qkv.bias"] = state[prefix + "qkv.bias"][rows]
        state[prefix + "out.weight"] = state[prefix + "out.weight"][:, _head_rows(q_heads, D)]
    smaller = dataclasses.replace(arch, num_heads=keep_kv * keep_group, num_kv_heads=keep_kv)
    state = {k: v.clone() for k, v in state.items()}
    return build_decoder(smaller, state, "pruned decoder")
