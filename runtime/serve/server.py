"""Run the app under uvicorn: loopback by default; SIGTERM/SIGINT stop accepting connections, let
running requests and streams finish (up to the drain timeout), stop the scheduler and exit 0."""

from __future__ import annotations

import logging
import os
import signal
import threading

from gptedge.runtime.serve.app import ServeConfig, create_app

log = logging.getLogger(__name__)


def serve(bundle_dir: str | os.PathLike[str], config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve ``bundle_dir`` on ``host:port`` until SIGTERM or SIGINT (blocks)."""
    import uvicorn

    app = create_app(bundle_dir, config)
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who reaches this address can use the model "
                    "(set --api-key or GPTEDGE_API_KEY)", host)
    # uvicorn installs the SIGTERM/SIGINT handlers: stop accepting, wait for open connections (our
    # streams) up to timeout_graceful_shutdown, then the app's lifespan stops the scheduler.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=int(config.drain_timeout_s)))
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it caught once it has shut down, under the handler it found:
        # a no-op one makes a drained SIGTERM an orderly exit 0 (SIGINT still ends as an interrupt)
        signal.signal(signal.SIGTERM, lambda signum, frame: log.info("SIGTERM: drained, exiting"))
    server.run()
