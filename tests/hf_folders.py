"""Tiny HuggingFace model folders written by transformers (random weights, fixed seeds) and their
exported bundles, cached per test session so test_hf_export.py and test_hf_clients.py share them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptedge.exporter import ExportConfig, export

SHARED_GPT2_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/data/gpt2-tokenizer/tokenizer.json"
SMALL_VOCAB = 100  # tokens of the word-level test tokenizer: <unk> <s> </s> <eot> w0 .. w95
CONTEXT = 64

_BUNDLES: dict[str, Path] = {}


def small_tokenizer(bos_template: bool = False):
    """A word-level tokenizer over "w0".."w95" plus specials; with ``bos_template`` its
    post-processor prepends <s> (as Llama 3's tokenizer.json does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3, **{f"w{i}": 4 + i for i in range(SMALL_VOCAB - 4)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<s>", "</s>", "<eot>"])
    if bos_template:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def llama_config(model_type: str = "llama", **overrides):
    """A 2-layer, hidden-32 Llama-family config (GQA: 4 query heads, 2 kv heads)."""
    from transformers import AutoConfig

    sizes = dict(vocab_size=SMALL_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=CONTEXT,
                 bos_token_id=1, eos_token_id=2)
    sizes.update(overrides)
    return AutoConfig.for_model(model_type, **sizes)


def gpt2_config(**overrides):
    from transformers import GPT2Config

    sizes = dict(vocab_size=SMALL_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT,
                 bos_token_id=1, eos_token_id=2)
    sizes.update(overrides)
    return GPT2Config(**sizes)


def write_folder(path: Path, config, seed: int = 0, dtype: torch.dtype | None = None,
                 tokenizer=None, tokenizer_config: dict | None = None, **save_kwargs) -> Path:
    """Save a random-weight transformers model of ``config`` (and a tokenizer) into ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def gpt2_tokenizer():
    """The real GPT-2 tokenizer from ../shared/data when present, else None."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(SHARED_GPT2_TOKENIZER)) if SHARED_GPT2_TOKENIZER.is_file() else None


def exported(kind: str, tmp_path_factory) -> tuple[Path, Path]:
    """(HF folder, bundle) for ``kind`` in ``"gpt2"``, ``"llama"``, ``"qwen2"``, exported once."""
    if kind not in _BUNDLES:
        root = tmp_path_factory.mktemp(f"hf-{kind}")
        folder = _FOLDERS[kind](root / "hf")
        config = ExportConfig(last_logits_variant=False)  # model_last.onnx is covered by the core tests
        export(folder, config, root / "bundle")
        _BUNDLES[kind] = root
    return _BUNDLES[kind] / "hf", _BUNDLES[kind] / "bundle"


def _gpt2_folder(path: Path) -> Path:
    tokenizer = gpt2_tokenizer()
    if tokenizer is None:  # without the shared data: the small tokenizer, GPT-2 style ids
        tokenizer = small_tokenizer()
        # GPT-2 style: one token (</s> here, <|endoftext|> there) is both BOS and EOS; the wider
        # init keeps greedy decoding of the random model from looping on one token
        config = gpt2_config(bos_token_id=2, eos_token_id=2, initializer_range=0.2)
    else:
        # a wider init than GPT-2's 0.02: with 50257 tokens that one greedy-decodes a single repeated token
        config = gpt2_config(vocab_size=tokenizer.get_vocab_size(), bos_token_id=50256, eos_token_id=50256,
                             initializer_range=0.2)
    return write_folder(path, config, seed=1, tokenizer=tokenizer,
                        tokenizer_config={"add_bos_token": False, "model_max_length": CONTEXT})


def _llama_folder(path: Path) -> Path:
    """Llama 3 style: GQA, llama3 RoPE scaling, untied head, eos list, BOS added by the template."""
    config = llama_config(rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})
    write_folder(path, config, seed=2, tokenizer=small_tokenizer(bos_template=True),
                 tokenizer_config={"bos_token": "<s>", "eos_token": "<eot>"})
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, 3]
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def _qwen2_folder(path: Path) -> Path:
    """q/k/v bias without o bias, tied head, and a sliding window that is configured but unused."""
    config = llama_config("qwen2", tie_word_embeddings=True, use_sliding_window=False)
    write_folder(path, config, seed=3, tokenizer=small_tokenizer(),
                 tokenizer_config={"add_bos_token": False, "eos_token": "</s>"})
    # transformers writes null for an unused window; real Qwen2 configs carry a number
    edit_config(path, sliding_window=4)
    return path


def edit_config(folder: Path, **changes) -> None:
    """Change keys of ``folder/config.json`` in place."""
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps(data))


_FOLDERS = {"gpt2": _gpt2_folder, "llama": _llama_folder, "qwen2": _qwen2_folder}
