"""The OpenAI-compatible backend against a small SSE server shaped like vLLM's: timing per
chunk, tokens from the usage report, HTTP errors as failures, 429 as a refusal."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from pdserve.bench.backends import OpenAIBackend
from pdserve.bench.workload import Sample


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body["max_tokens"] == 429:
        return web.json_response({"error": "overloaded"}, status=429)
    if body["max_tokens"] > 100:
        return web.json_response({"error": "max_tokens too large"}, status=400)
    assert body["stream"] and body["ignore_eos"] and body["prompt"] == [5, 6, 7]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(body["max_tokens"]):
        await asyncio.sleep(0.02)
        event = {"choices": [{"index": 0, "text": f" t{i}"}]}
        await resp.write(f"data: {json.dumps(event)}\n\n".encode())
    usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
    await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
    return resp


async def _run(samples):
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    backend = OpenAIBackend(f"http://127.0.0.1:{port}", "m")
    try:
        return [await backend.send(s) for s in samples]
    finally:
        await backend.close()
        await runner.cleanup()


def test_openai_backend_times_chunks_and_counts_usage_tokens():
    good, bad, busy = asyncio.run(_run([Sample((5, 6, 7), 5), Sample((5, 6, 7), 500),
                                        Sample((5, 6, 7), 429)]))
    assert good.success and good.output_len == 5 and len(good.itl) == 4
    assert 0.015 < good.ttft < 1.0 and all(0.01 < g < 1.0 for g in good.itl)
    assert good.tpot is not None and good.latency >= good.ttft
    assert not bad.success and bad.error.startswith("HTTP 400") and not bad.refused
    assert not busy.success and busy.refused and busy.code == "HTTP 429" and busy.latency > 0
