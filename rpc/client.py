"""A typed asyncio client for pdserve's gRPC API.

    async with PdServeClient("localhost:50051") as client:
        async for piece in client.generate("Hello", max_tokens=32, temperature=0):
            print(piece.text, end="")
        print(piece.final.finish_reason)

Errors arrive as `grpc.aio.AioRpcError` with the server's status code and message.

A server with API keys wants `api_key` (sent as `authorization: Bearer <key>` on every
call); one with TLS wants `tls_ca` (the PEM of the CA that signed its certificate, or
empty bytes for the system's roots), and with mutual TLS also `tls_cert` / `tls_key`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from pdserve.rpc import pdserve_pb2 as pb
from pdserve.rpc import pdserve_pb2_grpc
from pdserve.rpc.credentials import Credentials


@dataclass(frozen=True)
class Piece:
    """One streamed message: new text and token ids, or (last) the final result."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    final: pb.FinalResponse | None = None


class PdServeClient:
    def __init__(self, target: str, *, api_key: str | None = None,
                 tls_ca: bytes | None = None, tls_cert: bytes | None = None,
                 tls_key: bytes | None = None):
        credentials = Credentials(api_key, tls_ca, tls_cert, tls_key)
        self._channel = credentials.channel(target)
        self._stub = pdserve_pb2_grpc.PdServeStub(self._channel)
        self._metadata = credentials.metadata

    @classmethod
    def with_credentials(cls, target: str, credentials: Credentials) -> PdServeClient:
        return cls(target, api_key=credentials.api_key, tls_ca=credentials.tls_ca,
                   tls_cert=credentials.tls_cert, tls_key=credentials.tls_key)

    async def __aenter__(self) -> PdServeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str | Sequence[int] | Sequence[dict[str, str]], *,
                       max_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: Sequence[str] = (),
                       stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                       request_id: str = "", disaggregation: str = "auto",
                       ttft_ms: float | None = None, tpot_ms: float | None = None,
                       timeout: float | None = None) -> AsyncIterator[Piece]:
        """`prompt` is text, token ids, or chat messages ({"role", "content"} dicts)."""
        request = pb.GenerateRequest(
            request_id=request_id,
            disaggregation=pb.Disaggregation.Value(f"DISAGGREGATION_{disaggregation.upper()}"))
        if isinstance(prompt, str):
            request.prompt = prompt
        elif prompt and isinstance(prompt[0], dict):
            request.messages.extend(pb.ChatMessage(**m) for m in prompt)
        else:
            request.token_ids.extend(prompt)
        s = request.sampling
        for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                            ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
            if value is not None:
                setattr(s, name, value)
        s.stop.extend(stop)
        s.stop_token_ids.extend(stop_token_ids)
        s.ignore_eos = ignore_eos
        if ttft_ms is not None:
            request.slo.ttft_ms = ttft_ms
        if tpot_ms is not None:
            request.slo.tpot_ms = tpot_ms
        async for response in self._stub.Generate(request, timeout=timeout,
                                                  metadata=self._metadata):
            if response.HasField("final"):
                yield Piece(final=response.final)
            else:
                yield Piece(response.chunk.text, tuple(response.chunk.token_ids))

    async def cluster_status(self, timeout: float | None = None) -> pb.ClusterStatus:
        return await self._stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=timeout,
                                                 metadata=self._metadata)
