"""The HTTP server (uvicorn) of one router, on the router's own event loop, so the handlers
call the router where it runs, as the gRPC server's do.

Life: `HttpServer.start(router, config)` binds the port (0 picks one) before it returns,
so `port` is known and clients that connect at once wait in the listen backlog until
uvicorn accepts them; uvicorn serves as a task of the loop; `stop()` asks it to exit, gives
open streams `grace_s` to finish, and waits for it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass

import uvicorn

from pdserve.router.http.app import build_app
from pdserve.router.metrics import RouterMetrics
from pdserve.router.router import Router
from pdserve.router.security import ApiSecurity


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free one
    model_name: str = ""  # what clients pass as `model`; "" takes the cluster's model
    grace_s: float = 1.0  # open streams get this long to finish when the server stops


def _tls(security: ApiSecurity) -> tuple[dict, str]:
    """uvicorn's TLS settings for `security` (router.security): it reads PEM files, so the
    certificate, key and client CA are written to a folder only this user can read, and
    removed as soon as uvicorn loaded them (the SSL context keeps them)."""
    if not security.tls:
        return {}, ""
    folder = tempfile.mkdtemp(prefix="pdserve-tls-")  # 0700
    paths = {}
    files = (("cert.pem", security.tls_cert_chain), ("key.pem", security.tls_private_key),
             ("client-ca.pem", security.client_ca))
    for name, data in files:
        if data:
            paths[name] = os.path.join(folder, name)
            fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    settings = {"ssl_certfile": paths["cert.pem"], "ssl_keyfile": paths["key.pem"]}
    if "client-ca.pem" in paths:
        settings |= {"ssl_ca_certs": paths["client-ca.pem"], "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return settings, folder


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
        tls, folder = _tls(router.config.security)
        try:
            settings = uvicorn.Config(
                app, log_config=None, log_level="warning", lifespan="off", access_log=False,
                timeout_graceful_shutdown=config.grace_s, **tls)
            settings.load()  # reads the TLS files into its SSL context
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        return cls(uvicorn.Server(settings), sock, metrics)

    async def stop(self) -> None:
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._sock.close()
