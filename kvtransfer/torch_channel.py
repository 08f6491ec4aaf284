"""Payloads through torch.distributed point-to-point: gloo for CPU caches, NCCL for CUDA
caches. Control (handshake, chunk headers, Done, Abort, Ack) stays on the ZMQ control
plane; only the K+V bytes of each frame take the pair's process group.

Pairs. Each sender-receiver pair gets its own 2-rank group, set up when the handshake
succeeds: both sides build the group over the pair's rendezvous store, which the receiver
holds and the sender reaches through StoreRequest messages on the same connection
(kvtransfer.pair_store); there is no TCPStore and no port of its own. A pair's worker
thread owns the group and a FIFO of work, so the ZMQ I/O threads never block on it.

What is protected. The rendezvous travels only on the connection that passed the
handshake: with the cluster's keys that is CURVE (encrypted, from an authenticated peer),
and a connection that has not handshaken gets NO_HANDSHAKE instead of an answer. Each pair
has its own store, so no peer can read or write another pair's rendezvous. What is not:
once the group is up, the payload bytes travel over gloo or NCCL, unencrypted and
unauthenticated by these libraries (gloo's listening pairs take any connection that
reaches them); only the control plane is CURVE. Run the torch transport on a trusted
fabric, as NCCL always is.

Ordering. ZMQ keeps one pair's control messages in order and the group carries one pair's
payloads in order, so the receiver's pair worker takes the pair's chunk headers and Done
messages one by one and, for each header, receives exactly one payload. It drains a
header's payload even when the frame is rejected, so the stream stays aligned.

Bounded waits and bounded groups. Every group operation runs under the group's timeout; a
peer that vanishes makes it raise, the pair is dropped (sender) or rejects what comes
(receiver), and only that pair's transfers fail; a later transfer to the endpoint starts
with a fresh handshake. Each side keeps at most `max_pairs` groups; past that the least
recently used idle pair is closed first.

Staging: the sender stages each frame on its device into a fresh tensor that the pair
worker owns from `ship` on and drops once sent.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

import torch
import zmq

from pdserve.kvtransfer.channel import FrameSink, ReceiverChannel, SenderChannel
from pdserve.kvtransfer.frames import Frame
from pdserve.kvtransfer.messages import (
    ChunkHeader,
    Done,
    HandshakeReply,
    StoreReply,
    StoreRequest,
    encode,
)
from pdserve.kvtransfer.pair_store import HeldStore, RemoteStore
from pdserve.kvtransfer.torch_pairs import (
    TAG,
    PairWorker,
    backend_for,
    endpoint_host,
    local_address_towards,
    make_group,
)

_CLOSE_WAIT_S = 2.0  # for the pairs of a closing side to finish what they were doing


def _join(pairs: list[PairWorker]) -> None:
    deadline = time.monotonic() + _CLOSE_WAIT_S
    for pair in pairs:
        pair.join(max(0.0, deadline - time.monotonic()))


class TorchSenderChannel(SenderChannel):
    transport = "torch"

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 30.0,
                 max_pairs: int = 64):
        self._device = torch.device(device)
        self._backend = backend_for(self._device)
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._max_pairs = max_pairs
        self._pairs: dict[str, PairWorker] = {}
        self._stores: dict[str, RemoteStore] = {}  # the rendezvous of each pair

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self._device)

    def open(self, endpoint: str, reply: HandshakeReply) -> str | None:
        local = local_address_towards(endpoint_host(endpoint))
        store = RemoteStore(lambda req: self.post(endpoint, req), self._timeout.total_seconds())

        def connect():
            return make_group(self._backend, store, 0, local, self._timeout, self._device)

        def work(pair: PairWorker, payload: torch.Tensor) -> None:
            if pair.error is None:
                try:
                    pair.group.send([payload], 1, TAG).wait()
                except Exception as e:  # the receiver vanished or the group timed out
                    pair.fail(f"payload channel failed: {e}")
            if pair.busy == 1 and len(self._pairs) > self._max_pairs:
                self.wake()  # about to go idle while over the bound: evict on the I/O thread

        self.close_pair(endpoint)
        # The error wakes the I/O thread, which fails the endpoint's transfers if the pair
        # is still the endpoint's; a pair already replaced never fails its successor's.
        self._pairs[endpoint] = PairWorker("kv-send-channel", connect, work, self.wake)
        self._stores[endpoint] = store
        return None

    def on_store_reply(self, endpoint: str, reply: StoreReply) -> None:
        if (store := self._stores.get(endpoint)) is not None:
            store.on_reply(reply)

    def ship(self, endpoint: str, sock: zmq.Socket, frame: Frame) -> None:
        pair = self._pairs.get(endpoint)
        if pair is None or pair.error is not None:
            return  # the pair is dead: its transfers are failed and the link dropped
        sock.send(encode(frame.header))
        pair.submit(frame.payload)

    def failures(self) -> dict[str, str]:
        return {e: p.error for e, p in self._pairs.items() if p.error is not None}

    def evictable(self, live_endpoints: Callable[[], set[str]]) -> Sequence[str]:
        excess = len(self._pairs) - self._max_pairs
        if excess <= 0:
            return ()
        live = live_endpoints()
        idle = sorted((p.last_used, e) for e, p in self._pairs.items()
                      if e not in live and p.busy == 0)
        return [e for _, e in idle[:excess]]

    def close_pair(self, endpoint: str) -> None:
        if (store := self._stores.pop(endpoint, None)) is not None:
            store.close()  # a rendezvous still waiting fails now, not at its timeout
        if (pair := self._pairs.pop(endpoint, None)) is not None:
            pair.close()

    def close(self) -> None:
        pairs = list(self._pairs.values())
        for endpoint in list(self._pairs):
            self.close_pair(endpoint)
        _join(pairs)


class TorchReceiverChannel(ReceiverChannel):
    transport = "torch"

    def __init__(self, timeout_s: float = 30.0, max_pairs: int = 64):
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._max_pairs = max_pairs
        self._pairs: dict[bytes, PairWorker] = {}
        self._stores: dict[bytes, HeldStore] = {}  # the rendezvous of each pair

    def start(self, sink: FrameSink, endpoint: str, device: torch.device,
              dtype: torch.dtype) -> None:
        super().start(sink, endpoint, device, dtype)
        self._device, self._backend = device, backend_for(device)
        self._element_size = torch.empty((), dtype=dtype).element_size()
        self._host = endpoint_host(endpoint)

    def accept(self, peer: bytes) -> HandshakeReply:
        self._close_pair(peer)  # the sender reconnected: its old group is gone
        self._evict_idle()
        store = HeldStore(self._timeout.total_seconds())

        def connect():
            return make_group(self._backend, store, 1, self._host, self._timeout, self._device)

        self._stores[peer] = store
        self._pairs[peer] = PairWorker("kv-recv-channel", connect,
                                       lambda pair, msg: self._work(peer, pair, msg))
        return HandshakeReply(True)

    def on_store(self, peer: bytes, req: StoreRequest) -> None:
        store = self._stores.get(peer)
        if store is None:  # evicted since its handshake
            return self.sink.post(peer, StoreReply(req.seq, False, reason="no pair"))
        store.serve(req, lambda reply: self.sink.post(peer, reply))

    def on_chunk(self, peer: bytes, header: ChunkHeader, rest: list[zmq.Frame]) -> None:
        self._route(peer, header)

    def on_done(self, peer: bytes, done: Done) -> None:
        self._route(peer, done)  # after the pair's earlier payloads, never before

    def close(self) -> None:
        pairs = list(self._pairs.values())
        for peer in list(self._pairs):
            self._close_pair(peer)
        _join(pairs)

    def _close_pair(self, peer: bytes) -> None:
        if (store := self._stores.pop(peer, None)) is not None:
            store.close()
        if (pair := self._pairs.pop(peer, None)) is not None:
            pair.close()

    def _route(self, peer: bytes, msg: ChunkHeader | Done) -> None:
        pair = self._pairs.get(peer)
        if pair is None:  # closed under it: the sender must handshake again
            return self.sink.reject(peer, msg.transfer_id, "payload channel closed")
        pair.submit(msg)

    def _evict_idle(self) -> None:
        while len(self._pairs) >= self._max_pairs:
            idle = [p for p, pair in self._pairs.items() if pair.busy == 0]
            if not idle:
                return  # every pair has work in flight: let the table grow for now
            oldest = min(idle, key=lambda p: self._pairs[p].last_used)
            self._close_pair(oldest)
            self.sink.forget(oldest)

    # -- pair worker threads ---------------------------------------------------------------

    def _work(self, peer: bytes, pair: PairWorker, msg: ChunkHeader | Done) -> None:
        if isinstance(msg, Done):
            return self.sink.complete(peer, msg)
        if pair.error is None:
            buf = torch.empty(msg.payload_bytes(self._element_size), dtype=torch.uint8,
                              device=self._device)
            try:
                pair.group.recv([buf], 0, TAG).wait()
            except Exception as e:  # the sender vanished or the group timed out
                pair.fail(f"payload channel failed: {e}")
        if pair.error is not None:
            return self.sink.reject(peer, msg.transfer_id, pair.error)
        self.sink.deliver(peer, msg, buf if buf.is_cuda else memoryview(buf.numpy()))
