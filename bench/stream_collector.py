"""A synchronous stand-in for the router's end of the worker stream (protocol.stream), for
benchmarks and tests that drive workers directly: a ZMQ ROUTER socket (a CURVE server given
the cluster's keys, as the router's is) and a thread that files every token chunk and
prefill outcome by transfer id, with each token's arrival time."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import zmq

from pdserve.kvtransfer.curve import CurveGate, CurveKeyring
from pdserve.protocol import PrefillOutcome, TokenBatch, TokenChunk
from pdserve.protocol.stream import decode


@dataclass
class Streamed:
    """What arrived for one transfer id."""

    token_ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # the worker's step time, per token
    arrivals: list[float] = field(default_factory=list)  # time.time() here, per token
    first: TokenChunk | None = None
    final: TokenChunk | None = None
    outcome: PrefillOutcome | None = None  # the prefill worker's, when there was one


class StreamCollector:
    def __init__(self, host: str = "127.0.0.1", curve: CurveKeyring | None = None) -> None:
        self._gate = CurveGate(curve) if curve is not None else None
        self._sock = (self._gate.server(zmq.ROUTER) if self._gate is not None
                      else zmq.Context.instance().socket(zmq.ROUTER))
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"tcp://{host}:*")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.streams: dict[str, Streamed] = {}
        self.errors: list[str] = []  # what broke the protocol (a chunk after the final one)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="stream-collector", daemon=True)
        self._thread.start()

    def wait_final(self, transfer_id: str, timeout: float = 60.0) -> Streamed:
        """The transfer's stream once its final chunk arrived; TimeoutError otherwise."""
        return self._wait(transfer_id, lambda s: s.final is not None, "final chunk", timeout)

    def wait_outcome(self, transfer_id: str, timeout: float = 60.0) -> PrefillOutcome:
        """The prefill worker's outcome for the transfer; TimeoutError otherwise."""
        return self._wait(transfer_id, lambda s: s.outcome is not None, "prefill outcome",
                          timeout).outcome

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self._sock.close()
        if self._gate is not None:
            self._gate.close()

    def _wait(self, transfer_id: str, ready, what: str, timeout: float) -> Streamed:
        with self._cond:
            if not self._cond.wait_for(
                    lambda: (s := self.streams.get(transfer_id)) is not None and ready(s),
                    timeout):
                raise TimeoutError(f"no {what} for {transfer_id} in {timeout}s: "
                                   f"{self.streams.get(transfer_id)}")
            return self.streams[transfer_id]

    def _run(self) -> None:
        while not self._closed:
            if not self._sock.poll(50):
                continue
            message = decode(self._sock.recv_multipart()[-1])  # [routing id, message]
            now = time.time()
            with self._cond:
                if isinstance(message, TokenBatch):
                    for chunk in message.chunks:
                        self._file(chunk, message.time, now)
                else:
                    for outcome in message.outcomes:
                        self.streams.setdefault(outcome.transfer_id, Streamed()).outcome = outcome
                self._cond.notify_all()

    def _file(self, chunk: TokenChunk, step_time: float, now: float) -> None:
        s = self.streams.setdefault(chunk.transfer_id, Streamed())
        if s.final is not None:
            self.errors.append(f"a chunk after the final one for {chunk.transfer_id}")
            return
        s.token_ids += chunk.token_ids
        s.times += [step_time] * len(chunk.token_ids)
        s.arrivals += [now] * len(chunk.token_ids)
        s.first = s.first or chunk
        if chunk.finish is not None:
            s.final = chunk
