"""Peers from outside a cluster and inside it, for the data plane's CURVE tests: sockets
with no keys, with another cluster's keys, or with this cluster's, and the ZMTP verdict a
socket's monitor reports for its first connection."""

from __future__ import annotations

import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve.deploy.spec import make_curve_keys
from pdserve.kvtransfer.curve import secure_client

# the verdicts of a ZMTP handshake, as a connecting socket's monitor tells them
_VERDICTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
             | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# how an outsider tries: without CURVE, with its own keys, with the server's public key
# and a client key of its own (what a leaked public key gives)
OUTSIDERS = ["plain", "other-cluster", "own-client-key"]


def outsider_socket(kind: int, how: str, keys) -> zmq.Socket:
    """A socket of `kind` that tries to reach a server of `keys`'s cluster as `how` says."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    other = make_curve_keys()
    if how == "other-cluster":
        secure_client(sock, other)
    elif how == "own-client-key":
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey, sock.curve_secretkey = other.client_public, other.client_secret
    return sock


def insider_socket(kind: int, keys) -> zmq.Socket:
    """A socket of `kind` holding the cluster's client keys, as a worker's do."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, keys)
    return sock


def connect_and_judge(sock: zmq.Socket, endpoint: str, messages=(),
                      timeout_s: float = 10.0) -> int:
    """Connect `sock` to `endpoint`, queue `messages` (each a list of frames) to go out once
    it may, and return the first handshake's verdict (a zmq.EVENT_HANDSHAKE_* value)."""
    monitor = sock.get_monitor_socket(_VERDICTS)
    try:
        sock.connect(endpoint)
        for frames in messages:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                # no pipe to queue on: the handshake already failed and the connection was
                # dropped (a loaded machine gets there before the sends); nothing went out
                break
        assert monitor.poll(int(timeout_s * 1000)), "no handshake verdict"
        return recv_monitor_message(monitor)["event"]
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
