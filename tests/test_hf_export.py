"""HF folders → bundles: config mapping, weight formats, tokenizer ids, refusals, parity vs transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import shared_file
from hf_folders import CONTEXT, exported, gpt2_config, llama_config, small_tokenizer, write_folder

from gptedge.exporter import ExportConfig, export
from gptedge.exporter.checkpoints.hf import load_hf
from gptedge.exporter.checkpoints.hf_config import architecture_from_config
from gptedge.exporter.model import empty_past
from gptedge.exporter.pipeline import build_decoder
from gptedge.exporter.validate import parity_inputs
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.errors import InputError, UnsupportedModelError

pytest.importorskip("transformers")
NO_TOKENIZER = ExportConfig(allow_missing_tokenizer=True)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_export_passes_checker_and_parity_against_transformers(tmp_path_factory, kind):
    folder, path = exported(kind, tmp_path_factory)
    onnx.checker.check_model(str(path / "model.onnx"))
    manifest = load_bundle(path).manifest
    assert manifest.parity["passed"] and manifest.parity["max_abs"] <= 1e-4
    assert manifest.source["reference"] == "transformers"
    assert manifest.source["model_type"] == kind
    assert (path / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    assert (path / "tokenizer.json").is_file() and "tokenizer:tokenizer.json" in manifest.files


def test_gpt2_bundle_tokenizer_and_architecture(tmp_path_factory):
    _, path = exported("gpt2", tmp_path_factory)
    manifest = load_bundle(path).manifest
    arch, info = manifest.architecture, manifest.tokenizer
    assert (arch.norm, arch.position, arch.activation, arch.tie_word_embeddings) == (
        "layernorm", "learned", "gelu_tanh", True)
    assert info.kind == "hf" and info.add_bos is False and info.vocab_size == arch.vocab_size
    assert info.eos_ids == (info.bos_id,)  # GPT-2: <|endoftext|> is both
    assert not (path / "genai_config.json").exists()  # onnxruntime-genai config only for Llama-family


def test_llama3_style_bundle_keeps_eos_list_bos_template_and_genai_config(tmp_path_factory):
    _, path = exported("llama", tmp_path_factory)
    manifest = load_bundle(path).manifest
    arch, info = manifest.architecture, manifest.tokenizer
    assert (arch.num_heads, arch.num_kv_heads, arch.tie_word_embeddings) == (4, 2, False)
    assert arch.rope_scaling["rope_type"] == "llama3" and arch.rope_theta == 500000.0
    # generation_config.json's list wins over config.json (2) and tokenizer_config's "<eot>"
    assert info.eos_ids == (2, 3) and info.bos_id == 1
    assert info.add_bos is True  # no add_bos_token key: the template of tokenizer.json prepends <s>
    genai = json.loads((path / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert genai["model"]["eos_token_id"] == [2, 3] and genai["model"]["context_length"] == CONTEXT
    assert (decoder["num_key_value_heads"], decoder["head_size"], decoder["filename"]) == (2, 8, "model.onnx")
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert genai["search"]["past_present_share_buffer"] is False


def test_qwen2_maps_qkv_bias_without_output_bias(tmp_path_factory):
    folder, path = exported("qwen2", tmp_path_factory)
    arch = load_bundle(path).manifest.architecture
    assert (arch.qkv_bias, arch.attn_out_bias, arch.mlp_bias, arch.tie_word_embeddings) == (True, False, False, True)
    # the folder's sliding_window (4) is below the context but inactive (use_sliding_window false)
    config = json.loads((folder / "config.json").read_text())
    assert config["sliding_window"] == 4 and config["use_sliding_window"] is False


def assert_decoder_matches_transformers(folder, config: ExportConfig = NO_TOKENIZER):
    """The loaded decoder against transformers on left-padded prompts plus two cached decode steps
    (the ONNX graph's parity with the decoder is what the exports above prove)."""
    loaded = load_hf(folder, config)
    decoder = build_decoder(loaded.arch, loaded.state_dict, str(folder))
    reference = loaded.reference()
    ids, mask, positions = (torch.from_numpy(a) for a in parity_inputs(loaded.arch))
    ours = theirs = empty_past(loaded.arch, ids.shape[0])
    for _ in range(3):
        with torch.no_grad():
            got, ours = decoder(ids, mask, positions, ours)
            want, theirs = reference(ids, mask, positions, theirs)
        valid = mask[:, -ids.shape[1]:].bool()
        torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=0)
        ids = (ids[:, -1:] * 7 + 3) % loaded.arch.vocab_size
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
    return loaded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_safetensors_load_as_fp32(tmp_path, dtype):
    loaded = assert_decoder_matches_transformers(write_folder(tmp_path, llama_config(), dtype=dtype))
    assert all(t.dtype == torch.float32 for t in loaded.state_dict.values())


def test_sharded_safetensors(tmp_path):
    folder = write_folder(tmp_path, llama_config(), max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    loaded = assert_decoder_matches_transformers(folder)
    assert len(loaded.source["weight_files"]) > 1


def test_pytorch_model_bin(tmp_path):
    folder = write_folder(tmp_path, gpt2_config(), safe_serialization=False)
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    assert_decoder_matches_transformers(folder)


def test_gpt2_state_dict_without_prefix_and_with_mask_buffers(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_folder(tmp_path, gpt2_config())
    state = load_file(folder / "model.safetensors")
    assert all(k.startswith("transformer.") for k in state)
    # the original openai-community/gpt2 layout: no prefix, plus causal-mask buffers
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, CONTEXT, CONTEXT).tril() for i in range(2)})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert_decoder_matches_transformers(folder)


def test_gpt2_untied_head(tmp_path):
    loaded = assert_decoder_matches_transformers(write_folder(tmp_path, gpt2_config(tie_word_embeddings=False)))
    assert not loaded.arch.tie_word_embeddings and "lm_head.weight" in loaded.state_dict


@pytest.mark.parametrize("config", [
    llama_config(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    llama_config(rope_scaling={"type": "linear", "factor": 2.0}),
    llama_config("mistral", sliding_window=CONTEXT, head_dim=16),
], ids=["llama-tied-bias", "llama-linear-rope", "mistral-window-head-dim"])
def test_llama_family_variants_match_transformers(tmp_path, config):
    assert_decoder_matches_transformers(write_folder(tmp_path, config))


def _config_only(folder, **config) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("config", "key"), [
    ({"model_type": "falcon_h1"}, "model_type"),
    ({"model_type": "mixtral"}, "model_type"),
    ({**llama_config(rope_scaling={"rope_type": "mrope", "factor": 4.0}).to_dict()}, "rope_scaling"),
    ({**llama_config(hidden_act="gelu").to_dict()}, "hidden_act"),
    ({**llama_config(partial_rotary_factor=0.5).to_dict()}, "partial_rotary_factor"),
    ({**gpt2_config(activation_function="relu").to_dict()}, "activation_function"),
], ids=["unknown-type", "moe", "mrope", "gelu-llama", "partial-rotary", "gpt2-relu"])
def test_unsupported_configs_are_refused_by_key(tmp_path, config, key):
    _config_only(tmp_path, **config)
    with pytest.raises(UnsupportedModelError, match=key) as info:
        export(tmp_path, NO_TOKENIZER, tmp_path / "out")
    assert "config.json" in str(info.value)
    if key == "model_type":
        assert "llama" in str(info.value) and "gpt2" in str(info.value)
        assert ("mixture-of-experts" in str(info.value)) == (config["model_type"] == "mixtral")
    assert not (tmp_path / "out").exists()


def test_sliding_window_is_fine_when_the_context_fits_in_it(tmp_path):
    folder = write_folder(tmp_path, llama_config("mistral", sliding_window=16))
    loaded = load_hf(folder, ExportConfig(max_context=16, allow_missing_tokenizer=True))
    assert loaded.arch.num_kv_heads == 2


def test_missing_truncated_and_mismatching_weights(tmp_path):
    folder = write_folder(tmp_path / "m", llama_config())
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors"):
        load_hf(folder, NO_TOKENIZER)
    weights.unlink()
    with pytest.raises(InputError, match="no weights found"):
        load_hf(folder, NO_TOKENIZER)
    other = write_folder(tmp_path / "g", gpt2_config())
    (other / "model.safetensors").rename(weights)
    with pytest.raises(InputError, match="do not belong to a llama model"):
        load_hf(folder, NO_TOKENIZER)


def test_missing_tokenizer_is_an_error_unless_allowed_or_given(tmp_path):
    folder = write_folder(tmp_path / "m", llama_config())
    with pytest.raises(InputError, match="--no-tokenizer"):
        load_hf(folder, ExportConfig())
    loaded = load_hf(folder, NO_TOKENIZER)
    assert loaded.tokenizer.info.kind == "none" and loaded.tokenizer.info.eos_ids == (2,)
    small_tokenizer().save(str(tmp_path / "tok.json"))
    loaded = load_hf(folder, ExportConfig(tokenizer=tmp_path / "tok.json"))
    info = loaded.tokenizer.info
    assert info.kind == "hf" and info.vocab_size == 100 and info.add_bos is False
    assert loaded.tokenizer.files["tokenizer.json"] == (tmp_path / "tok.json").read_bytes()


def test_gpt2_vocab_and_merges_without_tokenizer_json(tmp_path):
    import shutil

    folder = write_folder(tmp_path / "m", gpt2_config(bos_token_id=50256, eos_token_id=50256))
    (tmp_path / "empty").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shared_file("gpt2-tokenizer", name), folder / name)
    info = load_hf(folder, ExportConfig()).tokenizer.info
    assert (info.kind, info.vocab_size, info.eos_ids, info.add_bos) == ("hf", 50257, (50256,), False)
    with pytest.raises(InputError, match="no tokenizer.json"):
        load_hf(folder, ExportConfig(tokenizer=tmp_path / "empty", allow_missing_tokenizer=True))


def test_pickled_code_in_pytorch_model_bin_is_refused(tmp_path):
    folder = write_folder(tmp_path, gpt2_config(), safe_serialization=False)
    torch.save({"weights": np.arange(3)}, folder / "pytorch_model.bin")  # numpy object: not weights-only
    with pytest.raises(InputError, match="weights_only"):
        load_hf(folder, NO_TOKENIZER)


def test_without_transformers_the_decoder_is_the_reference(tmp_path):
    folder = write_folder(tmp_path / "m", gpt2_config())
    code = ("import sys; sys.modules['transformers'] = None\n"  # makes `import transformers` fail
            "from gptedge.exporter.checkpoints.hf import load_hf\n"
            "from gptedge.exporter import ExportConfig\n"
            f"loaded = load_hf({str(folder)!r}, ExportConfig(allow_missing_tokenizer=True))\n"
            "print(loaded.reference is None, loaded.source['reference'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True gptedge decoder (transformers not installed)"
    assert "transformers is not installed" in result.stderr


def test_opt_switches_map_from_config():
    """OPT's optional keys reach the architecture (config only: transformers 4.57 cannot build an OPT
    with ``layer_norm_elementwise_affine: false``, its ``_init_weights`` fills the absent weight)."""
    cfg = dict(model_type="opt", vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               ffn_dim=96, max_position_embeddings=64, enable_bias=False, layer_norm_elementwise_affine=False,
               do_layer_norm_before=True, _remove_final_layer_norm=True, activation_function="gelu")
    arch = architecture_from_config(cfg, Path("config.json"))
    assert (arch.qkv_bias, arch.attn_out_bias, arch.mlp_bias) == (False, False, False)
    assert (arch.norm_affine, arch.final_norm, arch.norm_placement) == (False, False, "pre")
    assert arch.activation == "gelu" and arch.embed_proj_dim is None
