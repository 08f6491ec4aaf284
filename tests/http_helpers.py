"""Helpers of the HTTP API's tests: JSON requests with the standard library, /metrics
parsed into {sample name + labels: value}."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def post(url: str, path: str, body, timeout: float = 120.0) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a POST; `body` is JSON-encoded unless it is bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def get(url: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url + path, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(url: str) -> dict[tuple, float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, text = get(url, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def send(address: str, path: str, body: dict) -> http.client.HTTPConnection:
    """A POST sent, its answer not read: the connection."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn


def open_stream(address: str, path: str, body: dict) -> tuple[http.client.HTTPConnection,
                                                               http.client.HTTPResponse]:
    """A streamed POST left open: the connection and its response (headers read; a stream
    answers them with its first token), to read lines from."""
    conn = send(address, path, body)
    return conn, conn.getresponse()
