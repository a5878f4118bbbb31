"""`gptedge serve` (the ``gptedge[serve]`` extra): an OpenAI-compatible HTTP server with continuous
batching. Nothing here is imported by ``import gptedge.runtime``; FastAPI, uvicorn and
prometheus-client are imported only by :mod:`~gptedge.runtime.serve.app` and its neighbours."""
