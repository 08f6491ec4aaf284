"""CURVE on the data plane's ZMQ sockets: the cluster's keys applied to a socket that binds
(a server) or connects (a client), and the gate that admits only the cluster's clients.

Contract (see protocol.keys for the keys themselves): a server socket speaks CURVE with the
cluster's server secret key, and its context runs a ZAP handler that allows exactly one
client public key, the cluster's. A peer that does not speak CURVE, does not know the
server's public key, or cannot prove it holds the client secret key never completes the
ZMTP handshake: libzmq drops the connection before a single message reaches the socket,
so nothing it sends is ever read, let alone assembled. CURVE then encrypts and
authenticates every frame of the connection (curve25519 + xsalsa20-poly1305).

The gate owns a private ZMQ context: libzmq allows one ZAP handler per context, and several
servers of different configurations may live in one process (a test's receivers, a router
beside a decode worker), while the process-wide context's other sockets must not be
subjected to ZAP at all.

Life of a gate: `CurveGate(keys)` starts the ZAP handler thread and binds it *before* any
server socket exists (a CURVE server with no ZAP handler would admit any client that
knows the server's public key unless a ZAP domain is set and enforced, as here);
`server(kind)` makes server sockets in the gate's context; `close()`, once its sockets are
closed, stops the handler and terminates the context.
"""

from __future__ import annotations

import hmac
from typing import Protocol

import zmq
from zmq.auth.thread import ThreadAuthenticator

ZAP_DOMAIN = "pdserve"  # the one domain of every server socket and of its gate


class CurveKeyring(Protocol):
    """What the data plane needs of the cluster's keys (z85 text, 40 bytes each);
    `pdserve.protocol.CurveKeys` is the one the cluster hands out."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def secure_server(sock: zmq.Socket, keys: CurveKeyring) -> None:
    """Make `sock` (before it binds) a CURVE server with the cluster's server key that
    refuses every peer its context's ZAP handler does not allow (none without a handler)."""
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True
    # Fail closed: with a ZAP domain and ZAP_ENFORCE_DOMAIN, a handshake is refused when no
    # handler answers; without a domain libzmq would admit any CURVE client unasked.
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def secure_client(sock: zmq.Socket, keys: CurveKeyring) -> None:
    """Make `sock` (before it connects) a CURVE client: it accepts only a server holding the
    cluster's server secret key and proves the cluster's client key to it."""
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


class _AllowOne:
    """pyzmq's credentials provider: the one client key the cluster authorises."""

    def __init__(self, client_public: bytes):
        self._key = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self._key)


class CurveGate:
    def __init__(self, keys: CurveKeyring, context: zmq.Context | None = None):
        """`context`: a fresh context this gate then owns (an asyncio one for a router's
        loop); by default a plain one."""
        self.keys = keys
        self.context = context if context is not None else zmq.Context()
        # The handler's sockets are plain ones whatever the context's class: it runs on its
        # own thread, so handshakes are admitted while the owner's thread or loop is busy.
        self._auth = ThreadAuthenticator(self.context)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, _AllowOne(keys.client_public))

    def server(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        secure_server(sock, self.keys)
        return sock

    def close(self) -> None:
        """Stop the ZAP handler and end the context; every socket of it must be closed."""
        self._auth.stop()
        self.context.destroy(linger=0)  # a ZAP reply still queued must not hold it open
