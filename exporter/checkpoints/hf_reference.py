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

    The returned module takes ``input_ids, attention_mask, position_ids [B, S|T]`` and ``past``
    (one ``(key, value)`` pair per layer, each ``[B, K, P, D]``; ``P == 0`` means no cache) and
    returns ``logits [B, S, V]`` and the presents ``[B, K, P + S, D]``. Being a module, it can be
    deep-copied to float64 for the parity reference.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return TransformersReference(model)


class TransformersReference(torch.nn.Module):
    """A transformers causal LM called with the Decoder's convention (see :func:`build_reference`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        base = getattr(model, "model", None) or getattr(model, "transformer", None) or getattr(model, "gpt_neox", None)
        base = getattr(base, "decoder", base)  # OPT nests its layers one level deeper
        for layer in getattr(base, "layers", None) or getattr(base, "h", None) or ():  # Llama-style or GPT-2-style
            layer.register_forward_hook(_zero_non_finite)

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache()
        if past and past[0][0].shape[2] > 0:
            for layer, (key, value) in enumerate(past):
                cache.update(key.clone(), value.clone(), layer)
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        if hasattr(cache, "layers"):  # transformers >= 4.56
            presents = [(layer.keys, layer.values) for layer in cache.layers]
        else:
            presents = [tuple(pair) for pair in cache.to_legacy_cache()]
        return out.logits, presents


def _zero_non_finite(module, args, output):
    """Zero NaN in a layer's hidden states, which appear only on left-padding query rows in float64.

    transformers' eager attention adds float64's minimum as the mask, then runs softmax in float32,
    where it becomes -inf: a fully masked padding row turns to NaN, and NaN x 0 attention spreads
    it to every row of the next layer. Those rows are never compared and are masked as keys.
    """
    hidden = output[0] if isinstance(output, tuple) else output
    hidden.nan_to_num_(nan=0.0)
