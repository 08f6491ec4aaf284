"""Prometheus metrics of one router, in a registry of its own (several routers may share a
process): per-request metrics from its observers (router.metrics.requests) and gauges of
its state read at scrape time (router.metrics.cluster). The HTTP server exposes `render()`
on /metrics.

Life: `RouterMetrics(router)` registers its observer with the router; from then on every
request that ends moves the metrics. Requests a front end refuses before the router sees
them (bad input, a full intake) reach the same observer through `front_end_refused`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pdserve.router.metrics.cluster import ClusterCollector
from pdserve.router.metrics.requests import PREFIX, RequestMetrics
from pdserve.router.router import Router

__all__ = ["CONTENT_TYPE_LATEST", "PREFIX", "RouterMetrics"]


class RouterMetrics:
    def __init__(self, router: Router):
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry)
        self.registry.register(ClusterCollector(router))
        router.observers.append(self.requests)

    def render(self) -> bytes:
        """The text exposition format; call it on the router's event loop."""
        return generate_latest(self.registry)
