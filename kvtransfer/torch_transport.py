"""KV transfer with payloads through torch.distributed point-to-point: gloo for CPU caches,
NCCL for CUDA caches. Control (handshake, chunk headers, Done, Abort, Ack) stays on ZeroMQ
exactly as in zmq_transport; only the K+V bytes of each chunk take the side channel.

Pairs. Each sender-receiver pair gets its own 2-rank process group (sender rank 0, receiver
rank 1), created lazily when the handshake succeeds: the receiver runs a TCPStore and
answers the handshake with `host:port/prefix`, both sides build the group under that key
prefix. A pair's channel is a thread owning the group and a FIFO of work, so the ZMQ I/O
threads never block on a collective.

Ordering. ZMQ keeps one pair's control messages in order and the group carries one pair's
payloads in order, so the receiver's channel takes the pair's chunk headers and Done
messages one by one and, for each header, receives exactly one payload. It drains a
header's payload even when it rejects the frame, so the stream stays aligned.

Bounded waits and bounded groups. Every group operation runs under the group's timeout; a
peer that vanishes makes it raise, the pair is dropped on both sides and its transfers fail
(a later transfer to that endpoint starts with a fresh handshake). Each side keeps at most
`max_pairs` groups; past that the least recently used idle pair is closed first.

Checksums: CPU payloads carry the xxh3 of their bytes as on ZMQ; payloads that stay on a
GPU (NCCL) carry 0 and are not hashed (hashing would copy them to the host).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import queue
import socket
import threading
import time
import uuid
from collections import OrderedDict

import torch
import torch.distributed as dist

from pdserve.kvtransfer.assembly import FrameError
from pdserve.kvtransfer.base import KVSpec, TransferStatus
from pdserve.kvtransfer.messages import (
    Ack,
    ChunkHeader,
    Done,
    HandshakeReply,
    checksum,
    encode,
)
from pdserve.kvtransfer.zmq_transport import ZmqReceiver, ZmqSender, _Peer

log = logging.getLogger(__name__)
_TAG = 0


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _endpoint_host(endpoint: str) -> str:
    """Where peers reach the TCPStore of a receiver bound at `endpoint`: its tcp:// host;
    for a wildcard bind, this machine's address on the default route; loopback for ipc://."""
    if not endpoint.startswith("tcp://"):
        return "127.0.0.1"
    host = endpoint.removeprefix("tcp://").rpartition(":")[0] or "*"
    if host in ("*", "0.0.0.0"):
        return _local_address_towards("192.0.2.1")  # TEST-NET-1: only the route is looked up
    return host


def _local_address_towards(host: str) -> str:
    """This machine's address on the route to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _make_group(backend: str, store: dist.Store, rank: int, address: str,
                timeout: datetime.timedelta, device: torch.device):
    """A 2-rank process group over `store`; blocks until the peer joins or `timeout`."""
    if backend == "nccl":  # pragma: no cover - needs CUDA
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
    return dist.ProcessGroupGloo(store, rank, 2, options)


class _Channel:
    """One pair's group and the thread that alone uses it. `submit` never blocks; `close`
    stops the thread after the work already queued."""

    def __init__(self, name: str, connect, work):
        self._connect, self._work = connect, work
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.group = None
        self.error: str | None = None  # set once the group failed; the pair is then dead
        self.last_used = time.monotonic()
        self._busy = 0  # queued and running work items
        self._busy_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> int:
        return self._busy

    def submit(self, item) -> None:
        with self._busy_lock:
            self._busy += 1
        self.last_used = time.monotonic()
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        try:
            self.group = self._connect()
        except Exception as e:  # rendezvous timed out or the peer vanished
            self.error = f"payload channel setup failed: {e}"
        while (item := self._queue.get()) is not None:
            try:
                self._work(self, item)
            finally:
                with self._busy_lock:
                    self._busy -= 1


class TorchReceiver(ZmqReceiver):
    TRANSPORT = "torch"

    def __init__(self, spec: KVSpec, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 bind: str = "tcp://127.0.0.1:*", timeout_s: float = 30.0, max_pairs: int = 64):
        self._device = k_cache.device
        self._backend = backend_for(self._device)
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._max_pairs = max_pairs
        self._channels: OrderedDict[bytes, _Channel] = OrderedDict()
        self._pair_ids = itertools.count()
        self._host = _endpoint_host(bind)
        # port 0: the OS picks; wait_for_workers=False: senders come and go
        self._store = dist.TCPStore(self._host, 0, None, True, timeout=self._timeout,
                                    wait_for_workers=False)
        self._instance = uuid.uuid4().hex[:8]
        super().__init__(spec, k_cache, v_cache, bind)

    def close(self) -> None:
        super().close()
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    # -- I/O thread ----------------------------------------------------------------------

    def _accept_peer(self, peer: bytes) -> HandshakeReply:
        old = self._channels.pop(peer, None)
        if old is not None:  # the sender reconnected: its old group is gone
            old.close()
        self._evict_idle()
        prefix = f"pdserve-kv/{self._instance}/{next(self._pair_ids)}"
        store = dist.PrefixStore(prefix, self._store)

        def connect():
            return _make_group(self._backend, store, 1, self._host, self._timeout, self._device)

        self._channels[peer] = _Channel("kv-recv-channel", connect,
                                        lambda ch, item: self._work(peer, ch, item))
        return HandshakeReply(True, rendezvous=f"{self._host}:{self._store.port}/{prefix}")

    def _evict_idle(self) -> None:
        while len(self._channels) >= self._max_pairs:
            idle = [p for p, ch in self._channels.items() if ch.busy == 0]
            if not idle:
                return  # every pair has work in flight: let the table grow for now
            oldest = min(idle, key=lambda p: self._channels[p].last_used)
            self._channels.pop(oldest).close()
            self._peers.discard(oldest)

    def _route(self, peer: bytes, msg, frames) -> bool:
        if not isinstance(msg, ChunkHeader | Done):
            return False
        ch = self._channels.get(peer)
        if ch is None:  # evicted: the sender must handshake again
            self._reply(peer, Ack(msg.transfer_id, False, "payload channel closed"))
            return True
        self._channels.move_to_end(peer)
        ch.submit(msg)
        return True

    # -- channel threads -----------------------------------------------------------------

    def _work(self, peer: bytes, ch: _Channel, msg) -> None:
        if isinstance(msg, Done):
            with self._lock:
                a = self._assemblies.get(msg.transfer_id)
                if a is None:
                    verdict = Ack(msg.transfer_id, False,
                                  f"receiver does not expect transfer {msg.transfer_id!r}")
                else:
                    if not a.expire():
                        a.complete(msg)
                    verdict = Ack(msg.transfer_id, a.status is TransferStatus.DONE, a.reason)
            return self._post(peer, verdict)
        element = torch.empty((), dtype=self.spec.dtype).element_size()
        nbytes = msg.payload_bytes(element)
        if ch.error is None:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
            try:
                ch.group.recv([buf], 0, _TAG).wait()
            except Exception as e:  # the sender vanished or the group timed out
                ch.error = f"payload channel failed: {e}"
        if ch.error is not None:
            self.abort(msg.transfer_id, ch.error)
            return self._post(peer, Ack(msg.transfer_id, False, ch.error))
        payload = buf if buf.is_cuda else memoryview(buf.numpy()).cast("B")
        with self._lock:
            a = self._assemblies.get(msg.transfer_id)
            if a is None:
                verdict = Ack(msg.transfer_id, False,
                              f"receiver does not expect transfer {msg.transfer_id!r}")
            elif a.expire():
                verdict = Ack(a.transfer_id, False, a.reason)
            else:
                try:
                    a.accept(msg, payload, self.k_cache, self.v_cache)
                    verdict = None
                except FrameError as e:
                    a.fail(str(e))
                    verdict = Ack(a.transfer_id, False, a.reason)
        if verdict is not None:
            self._post(peer, verdict)


class TorchSender(ZmqSender):
    TRANSPORT = "torch"

    def __init__(self, spec: KVSpec, device: torch.device | str = "cpu",
                 handshake_timeout_s: float = 5.0, ack_timeout_s: float = 10.0,
                 timeout_s: float = 30.0, max_pairs: int = 64, max_frame_bytes: int = 1 << 20):
        self._device = torch.device(device)
        self._backend = backend_for(self._device)
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._max_pairs = max_pairs
        super().__init__(spec, handshake_timeout_s, ack_timeout_s, max_frame_bytes)

    def _chunk_message(self, transfer_id, layer, start, k, v) -> tuple:
        if k.shape != v.shape or k.dim() != 3:
            raise ValueError(f"K {tuple(k.shape)} and V {tuple(v.shape)} must both be "
                             "[tokens, kv_heads, head_dim]")
        staging = torch.stack((k, v)).to(self._device).contiguous().view(torch.uint8).flatten()
        digest = 0 if staging.is_cuda else checksum(memoryview(staging.numpy()).cast("B"))
        header = ChunkHeader(transfer_id, layer, start, start + k.shape[0],
                             str(k.dtype).removeprefix("torch."), k.shape[1], k.shape[2], digest)
        return [encode(header)], staging

    def _transmit(self, endpoint: str, peer: _Peer, message: tuple) -> None:
        parts, payload = message
        ch: _Channel | None = peer.channel
        if payload is not None and (ch is None or ch.error is not None):
            return  # the pair is dead: its transfers are failed and the peer dropped
        peer.sock.send_multipart(parts, copy=False)
        if payload is not None:
            ch.submit(payload)

    def _on_accepted(self, endpoint: str, peer: _Peer, reply: HandshakeReply) -> None:
        address, _, prefix = reply.rendezvous.partition("/")
        host, _, port = address.rpartition(":")
        if not (host and port.isdigit() and prefix):
            peer.channel = _DeadChannel(f"receiver sent no rendezvous ({reply.rendezvous!r})")
            return self._fail_endpoint(endpoint, peer.channel.error)
        local = _local_address_towards(host)

        def connect():
            store = dist.TCPStore(host, int(port), None, False, timeout=self._timeout)
            return _make_group(self._backend, dist.PrefixStore(prefix, store), 0, local,
                               self._timeout, self._device)

        def work(ch: _Channel, payload: torch.Tensor) -> None:
            if ch.error is not None:
                return
            try:
                ch.group.send([payload], 1, _TAG).wait()
            except Exception as e:  # the receiver vanished or the group timed out
                # The I/O thread fails the endpoint's transfers if this is still its channel;
                # a channel already replaced must not fail the transfers of its successor.
                ch.error = f"payload channel failed: {e}"

        peer.channel = _Channel("kv-send-channel", connect, work)

    def _check_deadlines(self, peers: dict[str, _Peer], poller) -> None:
        super()._check_deadlines(peers, poller)
        for endpoint, peer in list(peers.items()):
            ch = peer.channel
            if ch is not None and ch.error is not None:
                self._fail_endpoint(endpoint, ch.error)
                ch.close()
                self._drop_peer(endpoint, peers, poller)
        accepted = [e for e, p in peers.items() if p.channel is not None]
        while len(accepted) > self._max_pairs:
            live = self._book.live_endpoints()
            idle = [e for e in accepted if e not in live and peers[e].channel.busy == 0]
            if not idle:
                return
            oldest = min(idle, key=lambda e: peers[e].channel.last_used)
            peers[oldest].channel.close()
            self._drop_peer(oldest, peers, poller)
            accepted.remove(oldest)

    def _drop_peer(self, endpoint: str, peers: dict, poller, linger_ms: int = 0) -> None:
        ch = peers[endpoint].channel
        if ch is not None:
            ch.close()
        super()._drop_peer(endpoint, peers, poller, linger_ms)



class _DeadChannel:
    busy = 0

    def __init__(self, error: str):
        self.error = error
        self.last_used = time.monotonic()

    def submit(self, item) -> None:
        pass

    def close(self) -> None:
        pass

