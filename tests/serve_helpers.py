"""Shared by the serving tests: a tiny ChatML bundle (word-level tokenizer, random Llama weights)
and a real `gptedge serve` app on a free loopback port, run by uvicorn in a thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from hf_folders import llama_config, write_folder
from test_chat import CHATML, chatml_tokenizer

from gptedge.exporter import ExportConfig, export

CONTEXT = 4096  # long enough (~1 s of decoding) that a request outlasts a client's disconnect or a 429 check
_BUNDLE: list[Path] = []  # exported once per test session, shared by the serving test modules


def chat_bundle(tmp_path_factory) -> Path:
    """The ChatML test model, exported once per session (context 4096, with model_last and model_ort)."""
    if _BUNDLE:
        return _BUNDLE[0]
    root = tmp_path_factory.mktemp("serve")
    # head_dim 16: the smallest onnxruntime's GroupQueryAttention takes, so the bundle gets model_ort.onnx
    config = llama_config(vocab_size=100, bos_token_id=1, eos_token_id=1, max_position_embeddings=CONTEXT,
                          hidden_size=64)
    tok_cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
               "chat_template": CHATML}
    folder = write_folder(root / "hf", config, seed=11, tokenizer=chatml_tokenizer(), tokenizer_config=tok_cfg)
    export(folder, ExportConfig(validate=False), root / "bundle")
    _BUNDLE.append(root / "bundle")
    return _BUNDLE[0]


@contextlib.contextmanager
def running_server(bundle: Path, **config) -> Iterator[str]:
    """Serve ``bundle`` (ServeConfig fields as keywords) on 127.0.0.1, a free port; yields the base URL."""
    import uvicorn

    from gptedge.runtime.serve.app import ServeConfig, create_app

    app = create_app(bundle, ServeConfig(**config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
