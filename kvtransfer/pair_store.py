"""The torch transport's rendezvous store, carried on the KV control plane: no TCPStore.

A sender-receiver pair builds its 2-rank process group over a `torch.distributed.Store`.
A TCPStore would listen on a port of its own that anyone reaching the host can talk to;
this store instead lives in the receiver (`HeldStore`), and the sender reaches it through
`RemoteStore`, whose operations travel as StoreRequest / StoreReply messages on the
pair's ZMQ connection: the connection that passed the handshake, CURVE-authenticated and
encrypted when the cluster has keys. A peer that has not passed the handshake gets no
answer from the store (the receiver refuses it with NO_HANDSHAKE), and each pair has a
store of its own, so one pair can neither read nor write another's rendezvous.

Ops are those gloo and NCCL call: set, get, add, compare_set, check, wait, delete_key.
A `get` (or `wait`) of a key not yet set is answered when the key is set: the receiver's
I/O thread never blocks on it. Every blocking call here is bounded by the store's timeout.

Lifecycle. The receiver's channel makes a HeldStore per accepted peer and serves that
peer's requests into it (`serve`, on the I/O thread) while its own pair thread uses it as
a Store; `close` drops the waiting requests (their senders time out or were closed too).
The sender's channel makes a RemoteStore per pair, hands it the replies (`on_reply`, on
the I/O thread), and closes it with the pair: a caller still waiting then raises at once.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from pdserve.kvtransfer.messages import StoreReply, StoreRequest


class StoreOp(enum.StrEnum):
    """The `op` of a StoreRequest."""

    SET = "set"
    GET = "get"  # answered once the key exists
    ADD = "add"  # value: the decimal increment; the reply: the new value
    COMPARE_SET = "compare_set"  # expected, then value
    CHECK = "check"  # the reply: b"1" or b"0"
    DELETE = "delete"  # the reply: b"1" if the key existed


def _seconds(timeout: datetime.timedelta | float | None, default: float) -> float:
    if timeout is None:
        return default
    return timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout


class HeldStore(dist.Store):
    """The receiver's side: the pair's keys in memory. A Store for the local group, and the
    server of the peer's requests (`serve`)."""

    def __init__(self, timeout_s: float):
        super().__init__()
        self._timeout_s = timeout_s
        self._data: dict[str, bytes] = {}
        self._changed = threading.Condition()
        # key -> answers for GETs that came before the key: called once it is set
        self._waiting: dict[str, list[Callable[[bytes], None]]] = {}

    # -- Store, for the receiver's own group ------------------------------------------------

    def set(self, key: str, value) -> None:
        self._put(key, bytes(value))

    def get(self, key: str) -> bytes:
        self.wait([key])
        return self._data[key]

    def add(self, key: str, amount: int) -> int:
        with self._changed:
            new = int(self._data.get(key, b"0")) + amount
        self._put(key, str(new).encode())
        return new

    def compare_set(self, key: str, expected, desired) -> bytes:
        with self._changed:
            current = self._data.get(key)
            if (current is None and bytes(expected) == b"") or current == bytes(expected):
                current = bytes(desired)
                self._data[key] = current
                self._changed.notify_all()
                answers = self._waiting.pop(key, [])
            else:
                answers = []
        for answer in answers:
            answer(current)
        return current if current is not None else bytes(expected)

    def check(self, keys: list[str]) -> bool:
        with self._changed:
            return all(k in self._data for k in keys)

    def wait(self, keys: list[str], timeout=None) -> None:
        limit = _seconds(timeout, self._timeout_s)
        with self._changed:
            if not self._changed.wait_for(lambda: all(k in self._data for k in keys), limit):
                raise TimeoutError(f"rendezvous keys {keys} not set within {limit:.0f} s")

    def delete_key(self, key: str) -> bool:
        with self._changed:
            return self._data.pop(key, None) is not None

    def num_keys(self) -> int:
        with self._changed:
            return len(self._data)

    # -- the peer's requests (receiver's I/O thread) ---------------------------------------

    def serve(self, req: StoreRequest, answer: Callable[[StoreReply], None]) -> None:
        """Carry out `req` and `answer` it now, or, for a GET of a missing key, when the key
        is set. Never blocks."""
        def ok(value: bytes = b"") -> None:
            answer(StoreReply(req.seq, True, value))

        try:
            if req.op == StoreOp.SET:
                self._put(req.key, req.value)
                ok()
            elif req.op == StoreOp.GET:
                with self._changed:
                    value = self._data.get(req.key)
                    if value is None:
                        self._waiting.setdefault(req.key, []).append(ok)
                        return
                ok(value)
            elif req.op == StoreOp.ADD:
                ok(str(self.add(req.key, int(req.value))).encode())
            elif req.op == StoreOp.COMPARE_SET:
                ok(self.compare_set(req.key, req.expected, req.value))
            elif req.op == StoreOp.CHECK:
                ok(b"1" if self.check([req.key]) else b"0")
            elif req.op == StoreOp.DELETE:
                ok(b"1" if self.delete_key(req.key) else b"0")
            else:
                answer(StoreReply(req.seq, False, reason=f"unknown store op {req.op!r}"))
        except ValueError as e:  # a non-decimal ADD
            answer(StoreReply(req.seq, False, reason=f"bad store request: {e}"))

    def close(self) -> None:
        with self._changed:
            self._waiting.clear()

    def _put(self, key: str, value: bytes) -> None:
        with self._changed:
            self._data[key] = value
            self._changed.notify_all()
            answers = self._waiting.pop(key, [])
        for answer in answers:
            answer(value)


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: StoreReply | None = None


class RemoteStore(dist.Store):
    """The sender's side: each operation is a StoreRequest that `post` queues for the pair's
    connection; the caller (the pair's thread) waits for its reply, at most the timeout."""

    def __init__(self, post: Callable[[StoreRequest], None], timeout_s: float):
        super().__init__()
        self._post = post
        self._timeout_s = timeout_s
        self._seq = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._closed = False

    def set(self, key: str, value) -> None:
        self._call(StoreOp.SET, key, bytes(value))

    def get(self, key: str) -> bytes:
        return self._call(StoreOp.GET, key)

    def add(self, key: str, amount: int) -> int:
        return int(self._call(StoreOp.ADD, key, str(amount).encode()))

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self._call(StoreOp.COMPARE_SET, key, bytes(desired), bytes(expected))

    def check(self, keys: list[str]) -> bool:
        return all(self._call(StoreOp.CHECK, k) == b"1" for k in keys)

    def wait(self, keys: list[str], timeout=None) -> None:
        deadline = time.monotonic() + _seconds(timeout, self._timeout_s)
        for key in keys:
            self._call(StoreOp.GET, key, deadline=deadline)

    def delete_key(self, key: str) -> bool:
        return self._call(StoreOp.DELETE, key) == b"1"

    def num_keys(self) -> int:
        raise NotImplementedError("the pair's rendezvous store does not count its keys")

    def on_reply(self, reply: StoreReply) -> None:
        """(I/O thread) the receiver answered; an answer nobody waits for is dropped."""
        with self._lock:
            pending = self._pending.pop(reply.seq, None)
        if pending is not None:
            pending.reply = reply
            pending.done.set()

    def close(self) -> None:
        """The pair's connection is gone: every waiting call raises now."""
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.done.set()

    def _call(self, op: str, key: str, value: bytes = b"", expected: bytes = b"",
              deadline: float | None = None) -> bytes:
        if deadline is None:
            deadline = time.monotonic() + self._timeout_s
        pending = _Pending()
        with self._lock:
            if self._closed:
                raise ConnectionError("the pair's connection closed")
            seq = next(self._seq)
            self._pending[seq] = pending
        self._post(StoreRequest(seq, op, key, value, expected))
        if not pending.done.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                self._pending.pop(seq, None)
            raise TimeoutError(f"no rendezvous reply for {op} {key!r} in time")
        if pending.reply is None:
            raise ConnectionError("the pair's connection closed")
        if not pending.reply.ok:
            raise RuntimeError(f"rendezvous {op} {key!r} failed: {pending.reply.reason}")
        return pending.reply.value
