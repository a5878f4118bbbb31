"""The transformers model of an HF folder or a GGUF file as the parity reference, in the Decoder's
calling convention.

transformers is a development dependency only: :func:`transformers_reference` returns None when it
is not importable, and the export then checks its graph against gptedge's own decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptedge.exporter.checkpoints import ReferenceFn
from gptedge.runtime.errors import InputError

log = logging.getLogger(__name__)


def transformers_reference(source: Path, attention: str = "eager") -> Callable[[], ReferenceFn] | None:
    """A builder of the transformers reference for an HF folder or a ``.gguf`` file ``source``
    (``attention``: transformers' ``attn_implementation`` for a folder), or None without transformers."""
    try:
        import transformers  # noqa: F401  (only to learn whether the reference can be built)
    except ImportError:
        log.warning("transformers is not installed: parity of %s checks the ONNX graph against gptedge's "
                    "own decoder only (pip install 'gptedge[dev]' to compare with transformers)", source)
        return None
    if source.is_file():
        return lambda: build_gguf_reference(source)
    return lambda: build_reference(source, attention)


def build_reference(folder: Path, attention: str = "eager") -> ReferenceFn:
    """Load ``folder`` with ``AutoModelForCausalLM`` (fp32, ``attention`` as its attention
    implementation: eager unless the family says otherwise, eval mode) and wrap it.

    The returned module takes ``input_ids, attention_mask, position_ids [B, S|T]`` and ``past``
    (one ``(key, value)`` pair per layer, each ``[B, K, P, D]``; ``P == 0`` means no cache) and
    returns ``logits [B, S, V]`` and the presents ``[B, K, P + S, D]``. Being a module, it can be
    deep-copied to float64 for the parity reference.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
    model.eval()
    return TransformersReference(model)


def build_gguf_reference(path: Path) -> ReferenceFn:
    """transformers' own GGUF loading of ``path`` (its config mapping and ``load_gguf_checkpoint``,
    which dequantizes with the gguf package and undoes llama.cpp's q/k permutation), wrapped like
    :func:`build_reference`.

    ``from_pretrained(folder, gguf_file=...)`` does the same but needs accelerate, and it would
    hold a randomly initialised model beside the dequantized tensors: here the model is built on
    the meta device and the tensors are assigned, so the weights exist once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    model.tie_weights()
    missing = [k for k in result.missing_keys if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or result.unexpected_keys:
        raise InputError(f"{path}: transformers' GGUF loading left {missing[:5]} unset and did not use "
                         f"{result.unexpected_keys[:5]}; export with --no-validate, or report the file")
    _rebuild_meta_buffers(model, path)
    return TransformersReference(model.eval())


def _rebuild_meta_buffers(model: torch.nn.Module, where: Path) -> None:
    """Give the modules whose buffers are still on the meta device (RoPE's non-persistent
    ``inv_freq``) real ones, computed by the same class built from the model's config."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        try:
            fresh = type(module)(config=model.config)
        except TypeError as exc:
            raise InputError(f"{where}: cannot build {type(module).__name__} ({name}) of the transformers "
                             f"reference off the meta device ({exc}); export with --no-validate") from exc
        for key, buffer in fresh.named_buffers(recurse=False):
            setattr(module, key, buffer)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise InputError(f"{where}: the transformers reference has no values for {left[:5]}; "
                         "export with --no-validate, or report the file")


class TransformersReference(torch.nn.Module):
    """A transformers causal LM called with the Decoder's convention (see :func:`build_reference`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        config: Any = model.config
        # Falcon's new decoder architecture caches each kv head once per query head it serves
        self.kv_repeat = (config.num_attention_heads // config.num_kv_heads
                          if getattr(config, "new_decoder_architecture", False) else 1)
        base = getattr(model, "model", None) or getattr(model, "transformer", None) or getattr(model, "gpt_neox", None)
        base = getattr(base, "decoder", base)  # OPT nests its layers one level deeper
        for layer in getattr(base, "layers", None) or getattr(base, "h", None) or ():  # Llama-style or GPT-2-style
            layer.register_forward_hook(_zero_non_finite)

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache()
        if past and past[0][0].shape[2] > 0:
            for layer, (key, value) in enumerate(past):
                cache.update(*(t.repeat_interleave(self.kv_repeat, dim=1) for t in (key, value)), layer)
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        if hasattr(cache, "layers"):  # transformers >= 4.56
            presents = [(layer.keys, layer.values) for layer in cache.layers]
        else:
            presents = [tuple(pair) for pair in cache.to_legacy_cache()]
        if self.kv_repeat > 1:
            presents = [(key[:, ::self.kv_repeat], value[:, ::self.kv_repeat]) for key, value in presents]
        return out.logits, presents


def _zero_non_finite(module, args, output):
    """Zero NaN in a layer's hidden states, which appear only on left-padding query rows in float64.

    transformers' eager attention adds float64's minimum as the mask, then runs softmax in float32,
    where it becomes -inf: a fully masked padding row turns to NaN, and NaN x 0 attention spreads
    it to every row of the next layer. Those rows are never compared and are masked as keys.
    """
    hidden = output[0] if isinstance(output, tuple) else output
    hidden.nan_to_num_(nan=0.0)
