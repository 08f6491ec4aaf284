"""The router's OpenAI-compatible HTTP API (FastAPI + uvicorn) and its /metrics.

    /v1/completions, /v1/chat/completions   generation, whole or streamed (SSE)
    /v1/models, /health, /version, /metrics

Every request goes the gRPC API's way: built as a `GenerateRequest`, validated by the
router's Intake, served by `Router.generate` (router.http.app).
"""

from pdserve.router.http.server import HttpConfig, HttpServer

__all__ = ["HttpConfig", "HttpServer"]
