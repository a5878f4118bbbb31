"""GGUF as a source: a tiny Llama written with gguf.GGUFWriter (Q8_0 and F16 tensors, q/k permuted
the way llama.cpp's convert script does) exports to a bundle whose greedy tokens equal transformers'
own GGUF loading; the rebuilt tokenizer equals transformers' GGUF tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gptedge.exporter import ExportConfig, export  # noqa: E402
from gptedge.exporter.checkpoints.detect import detect_format, load_checkpoint  # noqa: E402
from gptedge.runtime import load  # noqa: E402
from gptedge.runtime.errors import UnsupportedModelError  # noqa: E402

Q8 = gguf.GGMLQuantizationType.Q8_0
F16 = gguf.GGMLQuantizationType.F16
# Every type gguf-py can also write (the K-quants it only reads): each linear weight of the tiny
# model is stored in one of them, so each dequantization path is checked against transformers.
LINEAR_TYPES = [gguf.GGMLQuantizationType[name] for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def byte_level_tokens() -> list[str]:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    return SPECIALS + alphabet + ["Ġt", "he", "Ġthe", "Ġa", "is"]


def llamacpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to llama q/k rows (half-split -> interleaved RoPE)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_llama(path: Path, arch_name: str = "llama", tied: bool = False) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = byte_level_tokens()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    state = {k: v.float().numpy() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    if tied:  # llama.cpp writes no output.weight for a tied head
        state["lm_head.weight"] = None
    _add_tensors(writer, state)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tensors(writer, state: dict[str, np.ndarray]) -> None:
    def put(name: str, value: np.ndarray, qtype) -> None:
        if qtype == F16:
            writer.add_tensor(name, value.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)

    put("token_embd.weight", state["model.embed_tokens.weight"], Q8)
    if state["lm_head.weight"] is not None:
        put("output.weight", state["lm_head.weight"], F16)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    types = iter(LINEAR_TYPES * 3)
    for i in range(2):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_q.weight", llamacpp_permute(state[p + "self_attn.q_proj.weight"], 4), next(types))
        put(f"blk.{i}.attn_k.weight", llamacpp_permute(state[p + "self_attn.k_proj.weight"], 2), next(types))
        put(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"], F16)
        put(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"], next(types))
        for ours, theirs in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            put(f"blk.{i}.{ours}.weight", state[p + f"mlp.{theirs}.weight"], next(types))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.gguf"
    write_tiny_llama(path)
    export(path, ExportConfig(validate=False), folder / "bundle")
    return path, folder / "bundle"


def test_greedy_equals_transformers_gguf_loading(tiny):
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, bundle = tiny  # transformers' own GGUF reading (from_pretrained(gguf_file=) would need accelerate)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)).eval()
    model.load_state_dict(load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"], strict=True)
    generator = load(bundle, backend="ort-cpu")
    for prompt in ([5, 40, 77, 260, 9], [100, 100, 3]):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert generator.generate(prompt, max_new_tokens=12, ignore_eos=True).tokens == want


def test_tokenizer_and_chat_template(tiny):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path, bundle = tiny
    ours = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["the cat is the best", "<|im_start|>user\nhé 12<|im_end|>", "  a\tthe"]:
        assert ours.encode(text).ids == theirs.encode(text, add_special_tokens=False)
    assert load_checkpoint(path, ExportConfig()).chat_template == TEMPLATE


def test_detected_by_magic_and_unknown_arch_refused(tmp_path):
    path = tmp_path / "model.weights"
    write_tiny_llama(path, arch_name="mamba")
    assert detect_format(path) == "gguf"
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported") as info:
        load_checkpoint(path, ExportConfig())
    assert info.value.exit_code == 3


def test_missing_output_weight_means_a_tied_head(tmp_path):
    write_tiny_llama(tmp_path / "tied.gguf", tied=True)
    checkpoint = load_checkpoint(tmp_path / "tied.gguf", ExportConfig())
    assert checkpoint.arch.tie_word_embeddings
    assert "lm_head.weight" not in checkpoint.state_dict
    bundle = export(tmp_path / "tied.gguf", ExportConfig(), tmp_path / "bundle")
    assert bundle.manifest.parity["passed"]
    # the parity reference is transformers' own GGUF loading (built on the meta device, tied head)
    assert bundle.manifest.source["reference"] == "transformers GGUF loading"
