"""Write a transformers model to GGUF the way llama.cpp's convert_hf_to_gguf.py does, with the gguf
package: tensor names from gguf's own table (``get_tensor_name_map``), llama.cpp's layout changes
(llama q/k rows permuted for interleaved RoPE, Gemma norms stored as ``1 + w``, GPT-2's Conv1D
weights transposed), a tied head stored once, and a small byte-level BPE tokenizer."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

F16 = gguf.GGMLQuantizationType.F16
Q8 = gguf.GGMLQuantizationType.Q8_0
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
GPT2_CONV1D = re.compile(r".*\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# HF config key -> GGUF metadata key (without "{arch}."), as the convert script writes them
LLAMA_META = {"num_hidden_layers": "block_count", "max_position_embeddings": "context_length",
              "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
              "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
              "rope_theta": "rope.freq_base", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
              "layer_norm_eps": "attention.layer_norm_epsilon", "norm_epsilon": "attention.layer_norm_epsilon",
              "sliding_window": "attention.sliding_window", "head_dim": "attention.key_length",
              "vocab_size": "vocab_size"}
GPT2_META = {"n_layer": "block_count", "n_positions": "context_length", "n_embd": "embedding_length",
             "n_head": "attention.head_count", "layer_norm_epsilon": "attention.layer_norm_epsilon"}
GEMMA2_META = {"attn_logit_softcapping": "attn_logit_softcapping",
               "final_logit_softcapping": "final_logit_softcapping"}


def byte_level_tokens() -> list[str]:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "Ġa", "is"]


def llamacpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf does to llama q/k rows (half-split -> interleaved RoPE)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _metadata(writer: gguf.GGUFWriter, arch: str, config) -> None:
    keys = GPT2_META if arch == "gpt2" else {**LLAMA_META, **(GEMMA2_META if arch == "gemma2" else {})}
    for hf_key, gguf_key in keys.items():
        value = getattr(config, hf_key, None)
        if value is None or (hf_key == "sliding_window" and arch not in ("gemma2", "gemma3")):
            continue
        put = writer.add_float32 if isinstance(value, float) else writer.add_uint32
        put(f"{arch}.{gguf_key}", value)
    if arch == "gpt2":
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    writer.add_rope_dimension_count(int(head_dim * factor))


def _tokenizer(writer: gguf.GGUFWriter) -> None:
    tokens = byte_level_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)


def _to_gguf(arch: str, hf_name: str, value: np.ndarray, config) -> np.ndarray:
    if arch == "llama" and re.fullmatch(r".*self_attn\.[qk]_proj\.weight", hf_name):
        heads = config.num_attention_heads if ".q_proj" in hf_name else config.num_key_value_heads
        return llamacpp_permute(value, heads)
    if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
        return value + 1.0
    if arch == "gpt2" and GPT2_CONV1D.fullmatch(hf_name):
        return np.ascontiguousarray(value.T)
    return value


def write_gguf(path: Path, model, arch: str, qtype: Callable[[str], gguf.GGMLQuantizationType] = lambda n: F16,
               name: str = "tiny", declared: str | None = None, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write ``model`` (a transformers causal LM) as a GGUF file of architecture ``arch``; every
    matrix is stored in ``qtype(gguf_name)``, vectors in F32. ``declared`` writes another
    ``general.architecture`` (for refusals); ``extra`` tensors are added as they are."""
    config = model.config
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(enum, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), declared or arch)
    writer.add_name(name)
    _metadata(writer, declared or arch, config)
    _tokenizer(writer)
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output.weight for a tied head
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{table.get_name(base)}.{suffix}"
        assert not gguf_name.startswith("None"), hf_name
        value = _to_gguf(arch, hf_name, tensor.float().numpy(), config)
        kind = qtype(gguf_name) if value.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == F16:
            writer.add_tensor(gguf_name, value.astype(np.float16))
        elif kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, value.astype(np.float32))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, kind), raw_dtype=kind)
    for gguf_name, value in (extra or {}).items():
        writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
