"""`gptedge serve BUNDLE`: an OpenAI-compatible HTTP server with continuous batching (the
``gptedge[serve]`` extra: FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a bundle over an OpenAI-compatible HTTP API (needs gptedge[serve])")
    p.add_argument("bundle", help="bundle folder made by `gptedge export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                                     "(default: $GPTEDGE_API_KEY; none when unset)")
    p.add_argument("--model-name", help="the model id clients see (default: the bundle folder's name)")
    p.add_argument("--backend", default="auto", help="auto (default: ort-cuda when usable, else ort-cpu), "
                                                     "ort-cpu or ort-cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds a SIGTERM lets running requests finish (default 30)")
    p.add_argument("--portable-batch", action="store_true",
                   help="decode the batch on the portable graph with padding (default: the onnxruntime variant "
                        "with per-row lengths when the bundle has model_ort.onnx and runs on the CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptedge.runtime.errors import InputError
    from gptedge.runtime.serve.app import ServeConfig
    from gptedge.runtime.serve.server import serve

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: must be 0..65535")
    if args.max_batch < 1 or args.max_queue < 0:
        raise InputError(f"--max-batch {args.max_batch} / --max-queue {args.max_queue}: need >= 1 / >= 0")
    config = ServeConfig(max_batch=args.max_batch, max_queue=args.max_queue,
                         api_key=args.api_key or os.environ.get("GPTEDGE_API_KEY") or None,
                         backend=args.backend, threads=args.threads, model_name=args.model_name,
                         drain_timeout_s=args.drain_timeout, portable_batch=args.portable_batch)
    serve(args.bundle, config, host=args.host, port=args.port, log_level="debug" if args.debug else "info")
    return 0
