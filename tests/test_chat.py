"""Chat templates: the exporter keeps the template, render_chat matches transformers'
apply_chat_template, the sandbox holds, and chat/sessions/CLI run on a tiny ChatML bundle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hf_folders import llama_config, write_folder

from gptedge.exporter import ExportConfig, export
from gptedge.runtime import load
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.chat import render_chat
from gptedge.runtime.errors import BundleError, GenerationError

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = [f"w{i}" for i in range(90)]
CONVERSATIONS = [
    [{"role": "user", "content": "w1 w2"}],
    [{"role": "system", "content": "w3"}, {"role": "user", "content": "w4 w5"}],
    [{"role": "system", "content": "w3"}, {"role": "user", "content": "w4"},
     {"role": "assistant", "content": "w6 w7"}, {"role": "user", "content": "w8"}],
]


def chatml_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate([*specials, "system", "user", "assistant", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials[1:])
    return tokenizer


@pytest.fixture(scope="module")
def chat_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    config = llama_config(vocab_size=100, bos_token_id=1, eos_token_id=1)
    tok_cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
               "chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "x"}]}
    folder = write_folder(root / "hf", config, seed=5, tokenizer=chatml_tokenizer(), tokenizer_config=tok_cfg)
    export(folder, ExportConfig(last_logits_variant=False, validate=False), root / "bundle")
    plain = write_folder(root / "hf-plain", config, seed=5, tokenizer=chatml_tokenizer(),
                         tokenizer_config={"add_bos_token": False})
    export(plain, ExportConfig(last_logits_variant=False, validate=False), root / "plain")
    return folder, root / "bundle", root / "plain"


def test_bundle_keeps_template_and_specials(chat_folders):
    _, bundle_dir, _ = chat_folders
    info = load_bundle(bundle_dir).manifest.tokenizer
    assert info.chat_template == "chat_template.jinja"
    assert (bundle_dir / "chat_template.jinja").read_text() == CHATML
    assert (info.bos_token, info.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert set(info.eos_ids) == {1, 3}  # config eos + the template's end-of-turn token
    files = json.loads((bundle_dir / "manifest.json").read_text())["files"]
    assert files["tokenizer:chat_template.jinja"]["path"] == "chat_template.jinja"


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(chat_folders, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    folder, bundle_dir, _ = chat_folders
    hf = AutoTokenizer.from_pretrained(folder)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render_chat(load_bundle(bundle_dir), messages, add_generation_prompt) == want
    generator = load(bundle_dir, backend="ort-cpu")
    from gptedge.runtime.chat import chat_ids
    assert chat_ids(generator, messages, add_generation_prompt) == \
        hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def _with_template(bundle_dir, tmp_path, template: str):
    bundle = load_bundle(bundle_dir)
    (tmp_path / "t.jinja").write_text(template)
    bundle.path = tmp_path
    object.__setattr__(bundle.manifest.tokenizer, "chat_template", "t.jinja")
    return bundle


def test_sandbox_and_raise_exception(chat_folders, tmp_path):
    _, bundle_dir, _ = chat_folders
    messages = CONVERSATIONS[0]
    unsafe = _with_template(bundle_dir, tmp_path, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(GenerationError, match="unsafe"):
        render_chat(unsafe, messages)
    mutate = _with_template(bundle_dir, tmp_path, "{% set x = messages.append(1) %}{{ messages | length }}")
    with pytest.raises(GenerationError, match="unsafe"):
        render_chat(mutate, messages)
    refuse = _with_template(bundle_dir, tmp_path, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(GenerationError, match="roles must alternate"):
        render_chat(refuse, messages)


def test_chat_session_reuses_cache_and_matches_one_shot(chat_folders):
    _, bundle_dir, _ = chat_folders
    generator = load(bundle_dir, backend="ort-cpu")
    session = generator.session(system="w3")
    first = session.chat("w4 w5", max_new_tokens=6)
    one_shot = generator.chat([{"role": "system", "content": "w3"}, {"role": "user", "content": "w4 w5"}],
                              max_new_tokens=6)
    assert first.tokens == one_shot.tokens
    assert "".join(generator.stream_chat(CONVERSATIONS[1], max_new_tokens=6)) == one_shot.text
    second = session.chat("w8", max_new_tokens=6)
    assert session.reused_tokens > len(first.tokens)
    again = generator.chat(session.messages[:-1], max_new_tokens=6)
    assert second.tokens == again.tokens


def test_missing_template_is_one_clear_error(chat_folders):
    _, _, plain = chat_folders
    with pytest.raises(BundleError, match="no chat template"):
        load(plain, backend="ort-cpu").chat(CONVERSATIONS[0])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptedge.runtime.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_chat_message_and_stdin(chat_folders):
    _, bundle_dir, plain = chat_folders
    out = _cli("chat", str(bundle_dir), "--system", "w3", "--message", "w4 w5", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    want = load(bundle_dir, backend="ort-cpu").chat(CONVERSATIONS[1], max_new_tokens=6).text
    assert out.stdout == want + "\n"
    piped = subprocess.run([sys.executable, "-m", "gptedge.runtime.cli", "chat", str(bundle_dir), "--system", "w3",
                            "--max-new-tokens", "6"], input="w4 w5\n\nw8\n", capture_output=True, text=True,
                           timeout=300)
    assert piped.returncode == 0 and piped.stdout.splitlines()[0] == want and len(piped.stdout.splitlines()) == 2
    missing = _cli("chat", str(plain), "--message", "w1")
    assert missing.returncode == BundleError.exit_code and missing.stderr.count("\n") == 1
    assert "no chat template" in missing.stderr
