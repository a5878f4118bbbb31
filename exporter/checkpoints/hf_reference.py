"""The transformers model of an HF folder as the parity reference, in the Decoder's calling convention.

transformers is a development dependency only: :func:`transformers_reference` returns None when it
is not importable, and the export then checks its graph against gptedge's own decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from gptedge.exporter.checkpoints import ReferenceFn

log = logging.getLogger(__name__)


def transformers_reference(folder: Path) -> Callable[[], ReferenceFn] | None:
    """A builder of the transformers reference for ``folder``, or None without transformers."""
    try:
        import transformers  # noqa: F401  (only to learn whether the reference can be built)
    except ImportError:
        log.warning("transformers is not installed: parity of %s checks the ONNX graph against gptedge's "
                    "own decoder only (pip install 'gptedge[dev]' to compare with transformers)", folder)
        return None
    return lambda: build_reference(folder)


def build_reference(folder: Path) -> ReferenceFn:
    """Load ``folder`` with ``AutoModelForCausalLM`` (fp32, eager attention, eval mode) and wrap it.

    The returned function takes ``input_ids, attention_mask, position_ids [B, S|T]`` and ``past``
    (one ``(key, value)`` pair per layer, each ``[B, K, P, D]``; ``P == 0`` means no cache) and
    returns ``logits [B, S, V]`` and the presents ``[B, K, P + S, D]``.
    """
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()

    def run(input_ids, attention_mask, position_ids, past):
        cache = DynamicCache()
        if past and past[0][0].shape[2] > 0:
            for layer, (key, value) in enumerate(past):
                cache.update(key.clone(), value.clone(), layer)
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        if hasattr(cache, "layers"):  # transformers >= 4.56
            presents = [(layer.keys, layer.values) for layer in cache.layers]
        else:
            presents = [tuple(pair) for pair in cache.to_legacy_cache()]
        return out.logits, presents

    return run
