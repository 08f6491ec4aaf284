"""The observers a router starts with (router.observe): the request log (router.request_log;
silent until its logger is enabled) and, given an OTLP endpoint, the tracer
(router.tracing). `close` flushes what a tracer still holds."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.router.observe import RequestObserver
from pdserve.router.request_log import RequestLog
from pdserve.router.tracing import RequestTracer, otlp_tracer


def default_observers(otlp_endpoint: str, router_id: str) -> list[RequestObserver]:
    observers: list[RequestObserver] = [RequestLog()]
    if otlp_endpoint:
        observers.append(otlp_tracer(otlp_endpoint, router_id=router_id))
    return observers


def close(observers: Sequence[RequestObserver]) -> None:
    for observer in observers:
        if isinstance(observer, RequestTracer):
            observer.shutdown()
