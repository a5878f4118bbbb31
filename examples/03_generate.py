"""Generate text from a bundle with the runtime alone (numpy + onnxruntime; no torch).

    python examples/03_generate.py bundles/tiny --prompt "def main():" --max-new-tokens 80
"""

import argparse

import gptedge.runtime as gptedge_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle folder")
    parser.add_argument("--prompt", default="def ", help="prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    args = parser.parse_args()

    with gptedge_runtime.load(args.bundle) as generator:  # backend "auto": TensorRT > CUDA > CPU
        # Streaming: pieces arrive as soon as they are stable text.
        stream = generator.stream(args.prompt, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=40, seed=0)
        print(args.prompt, end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        timings = stream.result.timings
        print(f"[{generator.backend_name}] {timings['new_tokens']} tokens, TTFT {1000 * timings['ttft_s']:.1f} ms, "
              f"{timings['decode_tokens_per_s']:.0f} tok/s")
        # One call, no streaming; a list of prompts would be batched (left-padded).
        result = generator.generate(args.prompt, max_new_tokens=16)
        print(f"greedy: {result.text!r} ({result.finish_reason})")
        # Log-probabilities of a text under the model.
        logprobs = generator.score(args.prompt + result.text)
        print(f"mean log-prob of prompt + greedy text: {logprobs.mean():.3f}")


if __name__ == "__main__":
    main()
