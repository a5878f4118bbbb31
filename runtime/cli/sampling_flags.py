"""The sampling flags of `gptedge generate` and `gptedge chat`, and the one place that turns them
into a :class:`~gptedge.runtime.sampling.SamplingOptions`."""

from __future__ import annotations

import argparse

from gptedge.runtime.sampling import SamplingOptions


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling flags shared by `generate` and `chat` (greedy unless --temperature > 0); each
    command adds its own --max-new-tokens (their defaults differ)."""
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (HF convention)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The options that --max-new-tokens and :func:`add_sampling_arguments`'s flags parsed into
    ``args``; a bad value raises a GenerationError naming the argument."""
    return SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                           stop=args.stop or (), ignore_eos=args.ignore_eos)
