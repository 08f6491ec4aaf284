"""The router's end of the worker stream (protocol.stream): one ZMQ ROUTER socket that decode
and colocated workers send tokens to and prefill workers send outcomes to.

Each TokenChunk and PrefillOutcome goes to the asyncio queue registered for its transfer
id; items for ids nobody waits for (an aborted request's tail, the outcome of a prefill
whose request already ended) are dropped. A malformed message is logged and dropped.

Authentication. With the cluster's CURVE keys (RouterConfig.curve) the socket is a CURVE
server in a ZMQ context of its own, whose ZAP handler (a thread of its own, so handshakes
do not wait for this loop) allows only the cluster's client key: a peer without it never
completes the handshake and nothing it sends is read. Within the cluster, each transfer's
tokens, and apart its prefill outcome, are taken only from the connection (ZMQ routing id)
that delivered the first of them; what another connection sends for it is dropped and
counted (`num_foreign`). A worker's connection keeps its routing id across reconnects
(worker.publisher; ROUTER_HANDOVER), so a network blip does not orphan its transfers.
Without keys (loopback only) any local process that reaches the endpoint is heard; the
transfer ids, 128 random bits, are then what keeps it out of a request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from pdserve.protocol import CurveKeys, PrefillOutcome, TokenBatch, TokenChunk
from pdserve.protocol.stream import decode

log = logging.getLogger(__name__)
_ITEM_KINDS = (TokenChunk, PrefillOutcome)  # a transfer's tokens and its prefill outcome
_ZAP_DOMAIN = "pdserve"  # the stream socket's; the ZAP handler answers for it alone


class _ClusterClients:
    """The ZAP handler's verdict: only the cluster's client key is allowed."""

    def __init__(self, keys: CurveKeys):
        self._client = keys.client_public

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self._client)


class StreamReader:
    """Binds `tcp://HOST:*`; `endpoint` is what the router's orders name."""

    def __init__(self, host: str = "127.0.0.1", curve: CurveKeys | None = None):
        self._auth: ThreadAuthenticator | None = None
        if curve is None:
            self._ctx = zmq.asyncio.Context.instance()
            self._sock = self._ctx.socket(zmq.ROUTER)
        else:
            # one ZAP handler per context: this reader's own, bound before the socket is
            self._ctx = zmq.asyncio.Context()
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback(_ZAP_DOMAIN, _ClusterClients(curve))
            self._sock = self._ctx.socket(zmq.ROUTER)
            self._sock.curve_secretkey = curve.server_secret
            self._sock.curve_publickey = curve.server_public
            self._sock.curve_server = True
            # fail closed: with a domain enforced, no ZAP answer means no admission
            self._sock.zap_domain = _ZAP_DOMAIN.encode()
            self._sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.bind(f"tcp://{host}:*")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._queues: dict[str, asyncio.Queue] = {}
        # (transfer id, item kind) -> the routing id of the connection that owns them
        self._owners: dict[tuple[str, type], bytes] = {}
        self.num_foreign = 0  # items dropped because another connection owns their transfer
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def open(self, transfer_id: str) -> asyncio.Queue:
        """Register a queue before the job is dispatched, so no item can arrive unseen."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues[transfer_id] = q
        return q

    def close_queue(self, transfer_id: str) -> None:
        if self._queues.pop(transfer_id, None) is not None:
            for kind in _ITEM_KINDS:
                self._owners.pop((transfer_id, kind), None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._sock.close()
        if self._auth is not None:
            self._auth.stop()
            self._ctx.destroy(linger=0)  # a ZAP reply still queued must not hold it open

    async def _run(self) -> None:
        while True:
            peer, *frames = await self._sock.recv_multipart()
            try:
                if len(frames) != 1:
                    raise ValueError(f"{len(frames)} frames, expected 1")
                message = decode(frames[0])
            except ValueError as e:
                log.error("dropped a stream message: %s", e)
                continue
            items = message.chunks if isinstance(message, TokenBatch) else message.outcomes
            for item in items:
                q = self._queues.get(item.transfer_id)
                if q is not None and self._owned_by(item.transfer_id, type(item), peer):
                    q.put_nowait(item)

    def _owned_by(self, transfer_id: str, kind: type, peer: bytes) -> bool:
        owner = self._owners.setdefault((transfer_id, kind), peer)
        if owner != peer:
            self.num_foreign += 1
            return False
        return True

