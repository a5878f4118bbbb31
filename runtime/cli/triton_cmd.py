"""`gptedge triton BUNDLE -o REPO`: write a Triton Inference Server model repository."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("triton", help="write a Triton Inference Server model repository for a bundle")
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="model repository folder (created if needed)")
    p.add_argument("--kind", default="python", choices=("python", "onnx", "tensorrt"),
                   help="python: streaming python-backend model on the gptedge runtime (default); onnx / "
                        "tensorrt: a step model with the KV cache as Triton implicit state (client: "
                        "gptedge.runtime.triton.step_client)")
    p.add_argument("--name", default=None, help="model name (default: gptedge, or gptedge_onnx / gptedge_trt)")
    p.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="instance kind for python/onnx models (default cpu; tensorrt always gpu)")
    p.add_argument("--max-batch", type=int, help="step models: sequences per execution (default 1; "
                   "tensorrt: the engine's)")
    p.add_argument("--max-sequences", type=int, default=8, help="step models: live sequences per instance (default 8)")
    p.add_argument("--link", action="store_true", help="python: link the bundle instead of copying it")
    p.add_argument("--backend", default="auto", help="python: gptedge backend inside the model (default auto)")
    p.add_argument("--threads", type=int, help="python: CPU threads per instance")
    p.add_argument("--engine", type=Path, help="tensorrt: engine file (default: the newest in BUNDLE/engines)")
    p.add_argument("--overwrite", action="store_true", help="replace the model folder if it exists")
    p.set_defaults(func=run)


DEFAULT_NAMES = {"python": "gptedge", "onnx": "gptedge_onnx", "tensorrt": "gptedge_trt"}


def run(args: argparse.Namespace) -> int:
    from gptedge.runtime.triton.repository import TritonConfig, write_repository

    config = TritonConfig(kind=args.kind, name=args.name or DEFAULT_NAMES[args.kind], instances=args.instances,
                          device=args.device, max_batch=args.max_batch, max_sequences=args.max_sequences,
                          link=args.link, backend=args.backend, threads=args.threads, engine=args.engine,
                          overwrite=args.overwrite)
    model_dir = write_repository(args.bundle, config, args.output)
    print(f"wrote {model_dir} ({args.kind}); serve it with: tritonserver --model-repository {args.output}")
    return 0
