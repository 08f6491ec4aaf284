"""A JSON line per request that reached the router, on the `pdserve.requests` logger: what a
user greps or loads into a dataframe without running a trace collector.

Each line is one JSON object (router.request_summary: request and trace ids, outcome,
status, token counts, stage timings in ms, workers, transfer ids, retries, SLO and whether
it was met), written when the request ends. `pdserve serve --log-requests` turns it on (as
vLLM's and SGLang's request logs are, it is off by default: one line per request is a lot
at thousands of requests per second).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

from pdserve.router.observe import RequestRecord
from pdserve.router.request_summary import RequestSummary

LOGGER = "pdserve.requests"


class RequestLog:
    """A RequestObserver that writes each record's summary as one JSON line at INFO."""

    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or logging.getLogger(LOGGER)

    def request_ended(self, record: RequestRecord) -> None:
        if self._log.isEnabledFor(logging.INFO):
            self._log.info(json.dumps(RequestSummary.of(record).fields, separators=(",", ":")))


def log_requests_to(stream: TextIO = sys.stderr) -> logging.Handler:
    """Send the request log to `stream`, bare lines (no level or logger name in front), and
    nowhere else; the handler, for the caller to remove."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger(LOGGER)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a root handler would print it again, prefixed
    return handler
