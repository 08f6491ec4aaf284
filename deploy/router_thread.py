"""A router and its gRPC server on their own asyncio loop, in a thread of this process: how
`pdserve serve` runs the router beside a local or a Ray cluster.

Life: `RouterThread(...)` starts the loop, connects to Redis (which must answer now; later
outages the router rides out on its last view), starts the router (its registry view and
token-stream reader), the gRPC server and, given `http`, the HTTP server on the same loop
(router.http), and returns once they listen (or raises why they could not); `close()` stops
the servers, the router and the Redis client, then the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from dataclasses import replace

from pdserve.deploy.redis_server import public_url
from pdserve.deploy.spec import ClusterSpec
from pdserve.models import resolve_model
from pdserve.protocol import WorkerRole
from pdserve.router.http import HttpConfig, HttpServer
from pdserve.router.registry import RegistryErrors, async_client
from pdserve.router.router import Router, RouterConfig
from pdserve.router.server import start_server
from pdserve.router.tokenizer import RouterTokenizer


class RouterThread:
    """A Router and its gRPC server on their own asyncio loop in a thread."""

    def __init__(self, config: RouterConfig, model_dir, redis_url: str, connect,
                 address: str = "127.0.0.1:0", roles: Iterable[WorkerRole] = (),
                 http: HttpConfig | None = None):
        """`roles`: the deployment's worker roles, each with its own health status;
        `http`: the OpenAI-compatible HTTP server's, None for none."""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.http: HttpServer | None = None
        self._args = (config, model_dir, redis_url, connect, address, tuple(roles), http)
        self._thread = threading.Thread(target=self._run, name=config.router_id, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"router failed to start: {self._error}") from self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as e:  # noqa: BLE001 - reported by the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        config, model_dir, redis_url, connect, address, roles, http = self._args
        self._redis = async_client(redis_url)
        try:
            await self._redis.ping()
        except RegistryErrors as e:
            await self._redis.aclose()
            raise RuntimeError(f"Redis at {public_url(redis_url)} does not answer: {e}") from e
        self.router = Router(config, RouterTokenizer(model_dir), self._redis, connect)
        await self.router.start()
        self._server, self.port = await start_server(self.router, address, roles)
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        if http is not None:
            self.http = await HttpServer.start(self.router, http)
            self.http_address = f"{http.host}:{self.http.port}"

    def call(self, coro):
        """Run a coroutine on the router's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        async def stop():
            if self.http is not None:
                await self.http.stop()
            await self._server.stop(grace=1.0)
            await self.router.close()
            await self._redis.aclose()

        if self._loop.is_running():
            self.call(stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class RoutedCluster:
    """What every cluster shares: its routers, one RouterThread each on one Redis; the
    first one's gRPC address is the cluster's. A cluster sets `spec`, `redis_url` and
    `routers` and implements `connect(record)`, the router's handle factory."""

    spec: ClusterSpec
    redis_url: str
    routers: list[RouterThread]

    @property
    def address(self) -> str:
        return self.routers[0].address

    @property
    def http_address(self) -> str:
        """The first router's HTTP server (host:port); it must have one."""
        return self.routers[0].http_address

    def add_router(self, address: str = "127.0.0.1:0",
                   http: HttpConfig | None = None) -> RouterThread:
        """Another router (id `router-<n>`) on the cluster's Redis, its gRPC server and,
        given `http`, its HTTP server (serving the cluster's model under its name unless
        `http` names it)."""
        config = replace(self.spec.router, router_id=f"router-{len(self.routers)}",
                         curve=self.spec.curve_keys)
        roles = dict.fromkeys(role for _, role in self.spec.roles())
        if http is not None and not http.model_name:
            http = replace(http, model_name=self.spec.model)
        router = RouterThread(config, resolve_model(self.spec.model), self.redis_url,
                              self.connect, address, roles, http)
        self.routers.append(router)
        return router

    def connect(self, record):
        raise NotImplementedError

    def _close_routers(self) -> None:
        for router in self.routers:
            router.close()
        self.routers.clear()
