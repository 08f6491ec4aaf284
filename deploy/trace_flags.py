"""`pdserve serve` flags for per-request traces and the request log (router.tracing,
router.request_log)."""

from __future__ import annotations

import argparse
import sys


def add_trace_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "traces and request log", "one trace per request (router queue, prefill queue, prefill, "
        "KV transfer, decode admission, decode) and one JSON line per request; the trace id "
        "is in the JSON line and in the `traceparent` trailing metadata of each Generate "
        "call, and a client's own `traceparent` puts the request in the client's trace")
    group.add_argument("--otlp-endpoint", default="", metavar="URL",
                       help="export request traces over OTLP/gRPC to this collector (e.g. "
                            "http://localhost:4317); default: none")
    group.add_argument("--log-requests", action="store_true",
                       help="write one JSON line per request to stderr (logger pdserve.requests: "
                            "ids, outcome, status, tokens, stage timings in ms, workers, "
                            "retries, SLO met); off by default, as in vLLM and SGLang")


def apply_trace_flags(args: argparse.Namespace) -> dict:
    """Turns the request log on if asked; the RouterConfig fields the flags set."""
    if args.log_requests:
        # here, not at the top: `pdserve --help` runs on a client install, without the router
        from pdserve.router.request_log import log_requests_to

        log_requests_to(sys.stderr)
    return {"otlp_endpoint": args.otlp_endpoint}
