"""Does the serving scheduler give every request `Generator.generate`'s tokens alone? (no HTTP)

    python benchmarks/serve_identity.py BUNDLE [--portable-batch] [--max-batch 8] [--requests 16]
    GPTEDGE_ORT_VARIANT=0 python benchmarks/serve_identity.py BUNDLE   # portable graph alone too

Greedy, EOS off, 64 new tokens; prompts of 28-35 random ids; one request joins every third step,
so rows join and leave a running batch. Prints how many requests differ from their run alone and
at which generated token each first differs.
"""

from __future__ import annotations

import argparse

import numpy as np

from gptedge.runtime import load
from gptedge.runtime.sampling import SamplingOptions
from gptedge.runtime.serve.scheduler import Job, Scheduler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--portable-batch", action="store_true")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    gen = load(args.bundle, backend="ort-cpu", threads=args.threads)
    vocab = gen.bundle.manifest.architecture.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, vocab, size=int(n)).tolist() for n in rng.integers(28, 36, size=args.requests)]
    options = SamplingOptions(max_new_tokens=64, ignore_eos=True, temperature=0.0)
    alone = [gen.generate(ids, options=options).tokens for ids in prompts]
    scheduler = Scheduler(gen, max_batch=args.max_batch, max_queue=args.requests, portable_batch=args.portable_batch)
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    jobs, step = [], 0
    while len(jobs) < len(prompts) or not all(j.done for j in jobs):
        if len(jobs) < len(prompts) and step % 3 == 0:
            i = len(jobs)
            jobs.append(Job(prompts[i], options, lambda u, i=i: outputs[i].extend(u.tokens)))
            scheduler.submit(jobs[-1])
        scheduler.step()
        step += 1
    scheduler.step()
    differ = {i: next(k for k, (a, b) in enumerate(zip(outputs[i], alone[i])) if a != b)
              for i in range(len(prompts)) if outputs[i] != alone[i]}
    print(f"{args.bundle} ({type(scheduler.batch).__name__}): {len(differ)} / {len(prompts)} requests differ "
          f"from their run alone; first differing token: {differ}")


if __name__ == "__main__":
    main()
