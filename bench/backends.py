"""Where the load generator sends requests: pdserve's gRPC API, or any OpenAI-compatible
completions endpoint with SSE streaming (vLLM, SGLang, ...), behind one interface.

Both send token-id prompts with a forced output length (ignore_eos, greedy) and time the
stream on the client exactly as vLLM's benchmark does (bench.metrics). A request turned away
at the door before any token (gRPC RESOURCE_EXHAUSTED, HTTP 429) is marked `refused`, with
the time to the refusal in `latency`.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod

from pdserve.bench.metrics import STAGES, RequestResult, Slo
from pdserve.bench.workload import Sample

# what a result keeps of the server's timing: the stages, the router's own TTFT (the
# client's minus it is what the API and the network add), and the router's predictions of
# it and of the TPOT (with a cost profile)
TIMINGS = (*STAGES, "first_token_ms", "predicted_ttft_ms", "predicted_tpot_ms")


class _StreamClock:
    """Client-side timing of one stream, as vLLM's benchmark takes it: TTFT at the first
    chunk with output, ITL between chunks, E2EL at the last."""

    def __init__(self, result: RequestResult):
        self.result = result
        self.start = self.last = time.perf_counter()

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.result.ttft == 0.0:
            self.result.ttft = now - self.start
        else:
            self.result.itl.append(now - self.last)
        self.last = now

    def end(self) -> None:
        self.result.latency = self.last - self.start

    def fail(self, code: str, error: str, refused: bool) -> None:
        """The stream ended with an error; a refusal counts only before any token."""
        r = self.result
        r.latency = time.perf_counter() - self.start
        r.code, r.error = code, error
        r.refused = refused and r.ttft == 0.0


class Backend(ABC):
    name: str

    @abstractmethod
    async def send(self, sample: Sample) -> RequestResult:
        """One request; never raises (a failure is a RequestResult with success False)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


class PdServeBackend(Backend):
    name = "pdserve"

    def __init__(self, target: str, disaggregation: str = "auto", timeout_s: float = 600.0,
                 slo: Slo | None = None, credentials=None):
        """`slo`, when given, goes with every request (GenerateRequest.slo): the router's
        admission then judges each request against it instead of its default.
        `credentials`: an rpc.credentials.Credentials (API key, TLS), None for none."""
        import grpc

        from pdserve.rpc import pdserve_pb2 as pb
        from pdserve.rpc import pdserve_pb2_grpc
        from pdserve.rpc.credentials import Credentials

        credentials = credentials or Credentials()
        self._pb = pb
        self._rpc_error = grpc.aio.AioRpcError
        self._metadata = credentials.metadata
        self._channel = credentials.channel(target)
        self._stub = pdserve_pb2_grpc.PdServeStub(self._channel)
        self._hint = pb.Disaggregation.Value(f"DISAGGREGATION_{disaggregation.upper()}")
        self._timeout = timeout_s
        self._slo = slo

    async def send(self, sample: Sample) -> RequestResult:
        pb = self._pb
        req = pb.GenerateRequest(token_ids=list(sample.prompt), disaggregation=self._hint)
        req.sampling.max_tokens = sample.output_len
        req.sampling.temperature = 0.0
        req.sampling.ignore_eos = True
        if self._slo is not None:
            req.slo.ttft_ms, req.slo.tpot_ms = self._slo.ttft_ms, self._slo.tpot_ms
        result = RequestResult(prompt_len=len(sample.prompt))
        clock = _StreamClock(result)
        final_seen = False
        try:
            async for response in self._stub.Generate(req, timeout=self._timeout,
                                                      metadata=self._metadata):
                if response.HasField("final"):
                    final_seen = True
                    f = response.final
                    result.output_len = f.usage.completion_tokens
                    result.stages = {s: getattr(f.timing, s) for s in TIMINGS}
                    result.disaggregated = f.disaggregated
                    result.kv_bytes = f.kv_transfer_bytes
                    result.cached_tokens = f.usage.cached_prompt_tokens
                    if f.disaggregated and f.timing.kv_received:
                        result.kv_window_s = f.timing.kv_received - f.timing.prefill_start
                    continue
                if response.chunk.token_ids:
                    clock.chunk()
            clock.end()
            result.success = result.output_len > 0
            if not final_seen:  # an OK status with no final message breaks the API
                clock.fail("NO_FINAL", "the stream ended without a final message", False)
        except Exception as e:  # noqa: BLE001 - grpc errors and anything else: a failure
            rpc = isinstance(e, self._rpc_error)
            code = e.code().name if rpc else type(e).__name__
            details = e.details() if rpc else str(e)
            clock.fail(code, f"{code}: {details}", code == "RESOURCE_EXHAUSTED")
        return result

    async def close(self) -> None:
        await self._channel.close()


class OpenAIBackend(Backend):
    """POST /v1/completions with `stream: true`; tokens counted from the usage report.
    Against pdserve's HTTP API, `extra_body` may carry its own fields (`disaggregation`,
    `slo`), and the stage timings come back in the last event's `pdserve` field."""

    name = "openai"

    def __init__(self, base_url: str, model: str, timeout_s: float = 600.0,
                 extra_body: dict | None = None):
        self._url = base_url.rstrip("/") + "/v1/completions"
        self._model = model
        self._timeout_s = timeout_s
        self._extra = dict(extra_body or {})
        self._session = None

    async def send(self, sample: Sample) -> RequestResult:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        body = {"model": self._model, "prompt": list(sample.prompt),
                "max_tokens": sample.output_len, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, **self._extra}
        result = RequestResult(prompt_len=len(sample.prompt))
        clock = _StreamClock(result)
        try:
            async with self._session.post(self._url, json=body) as resp:
                if resp.status != 200:
                    code = f"HTTP {resp.status}"
                    clock.fail(code, f"{code}: {(await resp.text())[:200]}",
                               resp.status == 429)
                    return result
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line.removeprefix("data:").strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if event.get("usage"):
                        result.output_len = event["usage"]["completion_tokens"]
                        details = event["usage"].get("prompt_tokens_details") or {}
                        result.cached_tokens = int(details.get("cached_tokens") or 0)
                    if event.get("pdserve"):
                        _stages(result, event["pdserve"])
                    choices = event.get("choices") or []
                    if choices and choices[0].get("text"):
                        clock.chunk()
            clock.end()
            result.success = result.output_len > 0 and result.ttft > 0
        except Exception as e:  # noqa: BLE001
            clock.fail(type(e).__name__, f"{type(e).__name__}: {e}", False)
        return result

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _stages(result: RequestResult, extension: dict) -> None:
    """What pdserve's `pdserve` extension field says of the request's stages."""
    timing = extension.get("timing", {})
    result.stages = {s: timing.get(s, 0.0) for s in TIMINGS}
    result.disaggregated = bool(extension.get("disaggregated"))
    result.kv_bytes = int(extension.get("kv_transfer_bytes", 0))
    if result.disaggregated and timing.get("kv_received"):
        result.kv_window_s = timing["kv_received"] - timing.get("prefill_start", 0.0)
