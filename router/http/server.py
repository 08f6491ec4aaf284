"""The HTTP server (uvicorn) of one router, on the router's own event loop, so the handlers
call the router where it runs, as the gRPC server's do.

Life: `HttpServer.start(router, config)` binds the port (0 picks one) before it returns,
so `port` is known and clients that connect at once wait in the listen backlog until
uvicorn accepts them; uvicorn serves as a task of the loop; `stop()` asks it to exit, gives
open streams `grace_s` to finish, and waits for it.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import uvicorn

from pdserve.router.http.app import build_app
from pdserve.router.metrics import RouterMetrics
from pdserve.router.router import Router


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free one
    model_name: str = ""  # what clients pass as `model`; "" takes the cluster's model
    grace_s: float = 1.0  # open streams get this long to finish when the server stops


class HttpServer:
    def __init__(self, server: uvicorn.Server, sock: socket.socket, metrics: RouterMetrics):
        self._server = server
        self._sock = sock
        self.metrics = metrics
        self.port: int = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))

    @classmethod
    async def start(cls, router: Router, config: HttpConfig) -> HttpServer:
        if not config.model_name:
            raise ValueError("HttpConfig.model_name must name the served model")
        metrics = RouterMetrics(router)
        app = build_app(router, metrics, config.model_name)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.host, config.port))
            sock.listen(2048)
        except OSError as e:
            sock.close()
            raise OSError(f"HTTP server on {config.host}:{config.port}: {e}") from e
        server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, log_level="warning", lifespan="off", access_log=False,
            timeout_graceful_shutdown=config.grace_s))
        return cls(server, sock, metrics)

    async def stop(self) -> None:
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._sock.close()
