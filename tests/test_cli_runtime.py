"""`gptedge generate / bench / inspect` in subprocesses; generate runs with torch made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hf_folders import exported

from gptedge.runtime import load

# A meta-path finder that refuses torch/transformers/tensorrt, then the CLI: proves `gptedge generate`
# works on a runtime-only install (a Jetson app without torch).
NO_TORCH = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'tensorrt'):
            raise ImportError(f'{name} is hidden for this test')
sys.meta_path.insert(0, Refuse())
from gptedge.runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(*args: str, hide_torch: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", NO_TORCH, *args] if hide_torch else [sys.executable, "-m", "gptedge.runtime.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_generate_streams_text_without_torch(tmp_path_factory):
    _, bundle = exported("gpt2", tmp_path_factory)
    out = cli("generate", str(bundle), "Hello", "--max-new-tokens", "12", "--ignore-eos", hide_torch=True)
    assert out.returncode == 0, out.stderr
    want = load(bundle, backend="ort-cpu").generate("Hello", max_new_tokens=12, ignore_eos=True).text
    assert out.stdout == want + "\n"
    assert "12 tokens (length)" in out.stderr and "backend ort-cpu" in out.stderr and "TTFT" in out.stderr
    same = cli("generate", str(bundle), "Hello", "--max-new-tokens", "12", "--ignore-eos", "--no-stream")
    assert same.stdout == out.stdout


def test_generate_reports_user_errors_in_one_line(gpt2_bundle):
    out = cli("generate", str(gpt2_bundle), "text", hide_torch=True)
    assert out.returncode == 6 and out.stderr.count("\n") == 1 and "token ids" in out.stderr
    out = cli("generate", str(gpt2_bundle), "1,2,3", "--ids", "--max-new-tokens", "4", "--temperature", "-1")
    assert out.returncode == 6 and "temperature" in out.stderr
    out = cli("generate", str(gpt2_bundle), "1,2,3", "--ids", "--backend", "ort-cuda")
    assert out.returncode == 5 and "gptedge[gpu]" in out.stderr


def test_bench_json_and_table(gpt2_bundle):
    out = cli("bench", str(gpt2_bundle), "--prompt-len", "8", "--new-tokens", "10", "--runs", "2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["backend"] == "ort-cpu" and report["new_tokens"] == 10
    assert report["ttft_ms"] > 0 and report["decode_tokens_per_s"] > 0 and report["peak_rss_mib"] > 10
    assert report["overhead_pct_of_decode_step"] < 100
    table = cli("bench", str(gpt2_bundle), "--prompt-len", "4", "--new-tokens", "4", "--runs", "1", "--batch", "2")
    assert table.returncode == 0 and "TTFT" in table.stdout and "all rows" in table.stdout


def test_inspect_shows_manifest_io_ops_and_sizes(gpt2_bundle):
    out = cli("inspect", str(gpt2_bundle), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["architecture"]["num_layers"] == 2 and info["ops"]["MatMul"] >= 2 * 4
    assert info["files"]["weights"]["bytes"] > 0 and info["parity"]["passed"] is True
    table = cli("inspect", str(gpt2_bundle))
    assert table.returncode == 0 and "past_key_values.1.value" in table.stdout and "MatMul" in table.stdout


def test_bench_defaults_fit_a_short_context(gpt2_bundle):
    # the tiny bundle's context (64) is shorter than the default 32 prompt + 128 new tokens
    out = cli("bench", str(gpt2_bundle), "--runs", "1", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["prompt_len"] + report["new_tokens"] <= 64 and report["new_tokens"] > 1


def test_too_many_new_tokens_never_suggests_truncating_to_nothing(gpt2_bundle):
    out = cli("generate", str(gpt2_bundle), "1,2,3", "--ids", "--max-new-tokens", "64")
    assert out.returncode == 6 and "truncate" not in out.stderr and "below 64" in out.stderr


def test_generate_ids_on_a_bundle_without_tokenizer_prints_the_ids(gpt2_bundle):
    out = cli("generate", str(gpt2_bundle), "1,2,3", "--ids", "--max-new-tokens", "5", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    want = load(gpt2_bundle, backend="ort-cpu").generate([1, 2, 3], max_new_tokens=5, ignore_eos=True).tokens
    assert out.stdout == ",".join(map(str, want)) + "\n"


def test_a_closed_generator_says_so(gpt2_bundle):
    from gptedge.runtime.errors import GenerationError

    generator = load(gpt2_bundle, backend="ort-cpu")
    generator.close()
    with pytest.raises(GenerationError, match="was closed"):
        generator.generate([1, 2, 3], max_new_tokens=2)
    generator.close()  # twice is fine
