"""The ONNX step model of `gptedge triton --kind onnx`, driven by StepClient through Triton's
sequence-batching semantics (replayed on onnxruntime: tests/triton_emulator.py), against Generator.

    python benchmarks/triton_step_check.py BUNDLE [--new-tokens 32]

Prints, per prompt and for one chat turn (when the bundle has a chat template), whether the greedy
tokens are identical. The tests do this on tiny models; this runs it on a real one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from triton_emulator import SequenceBatcherEmulator  # noqa: E402

from gptedge.runtime import load  # noqa: E402
from gptedge.runtime.triton.repository import TritonConfig, write_repository  # noqa: E402
from gptedge.runtime.triton.step_client import StepClient  # noqa: E402

PROMPTS = ["The history of the city begins with", "What is the capital of France?"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    model = write_repository(args.bundle, TritonConfig(kind="onnx", max_batch=2), tempfile.mkdtemp())
    client = StepClient(args.bundle, SequenceBatcherEmulator(model))
    same = True
    with load(args.bundle, backend="ort-cpu") as gen:
        for prompt in PROMPTS:
            a = client.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
            b = gen.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
            same &= a.tokens == b.tokens
            print(f"{a.tokens == b.tokens!s:5} {prompt!r} -> {a.text[:60]!r}")
        if gen.tokenizer_info.chat_template:
            messages = [{"role": "user", "content": "Name three colors."}]
            equal = client.chat(messages, max_new_tokens=args.new_tokens).tokens == \
                gen.chat(messages, max_new_tokens=args.new_tokens).tokens
            same &= equal
            print(f"{equal!s:5} chat {messages}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
