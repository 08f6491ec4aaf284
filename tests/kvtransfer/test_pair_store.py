"""The rendezvous store of a torch transport pair, the two halves wired back to back (what
the control plane would carry between them): every op a process group uses, a GET that
waits for its key without blocking the server, bounded waits, and a closed connection that
ends a waiting call at once."""

from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from pdserve.kvtransfer.messages import StoreReply, StoreRequest, decode, encode
from pdserve.kvtransfer.pair_store import HeldStore, RemoteStore, StoreOp


def pair(timeout_s=5.0, deliver=True):
    """A RemoteStore whose requests reach a HeldStore through the wire encoding."""
    held = HeldStore(timeout_s)
    remote = None

    def post(req):
        if deliver:
            held.serve(decode(encode(req)), lambda reply: remote.on_reply(decode(encode(reply))))

    remote = RemoteStore(post, timeout_s)
    return held, remote


def test_every_op_of_a_store_both_ways():
    held, remote = pair()
    remote.set("a", b"1")
    assert held.get("a") == b"1"
    held.set("b", b"2")
    assert remote.get("b") == b"2"
    assert remote.add("n", 3) == 3 and held.add("n", 2) == 5 and remote.add("n", 1) == 6
    assert remote.check(["a", "b"]) and not remote.check(["a", "missing"])
    assert remote.compare_set("c", b"", b"x") == b"x"  # absent and expected empty: set
    assert remote.compare_set("c", b"y", b"z") == b"x"  # mismatch: the current value
    assert remote.compare_set("c", b"x", b"z") == b"z"
    assert remote.compare_set("gone", b"e", b"z") == b"e" and not held.check(["gone"])
    assert remote.delete_key("a") and not remote.delete_key("a")
    remote.wait(["b", "c"])


def test_a_get_before_its_key_is_answered_when_it_is_set():
    held, remote = pair()
    got = []
    waiter = threading.Thread(target=lambda: got.append(remote.get("k")))
    waiter.start()
    # the request is parked in the server, not blocking it: other requests are served
    assert remote.add("other", 1) == 1
    held.set("k", b"v")
    waiter.join(10)
    assert got == [b"v"]


def test_waits_are_bounded_and_a_closed_connection_ends_them_at_once():
    held, remote = pair(timeout_s=0.2)
    with pytest.raises(TimeoutError):
        remote.get("never")
    with pytest.raises(TimeoutError):
        held.wait(["never"], datetime.timedelta(seconds=0.1))
    _, lost = pair(timeout_s=600, deliver=False)
    errors = []

    def call():
        try:
            lost.get("k")
        except ConnectionError as e:
            errors.append(e)

    waiter = threading.Thread(target=call)
    waiter.start()
    lost.close()
    waiter.join(10)  # well before the 600 s timeout
    assert len(errors) == 1
    with pytest.raises(ConnectionError):
        lost.set("k", b"v")


def test_a_bad_request_gets_a_failing_reply():
    held = HeldStore(1.0)
    replies = []
    held.serve(StoreRequest(1, "nonsense", "k"), replies.append)
    held.serve(StoreRequest(2, StoreOp.ADD, "k", b"not a number"), replies.append)
    assert [r.ok for r in replies] == [False, False]
    assert "unknown store op" in replies[0].reason and "bad store request" in replies[1].reason
    assert StoreReply(3, False, reason="x") == decode(encode(StoreReply(3, False, reason="x")))


def test_a_gloo_pair_forms_over_the_two_halves():
    held, remote = pair()
    out = {}

    def member(rank, store):
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=10)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        group = dist.ProcessGroupGloo(store, rank, 2, opts)
        t = torch.arange(16, dtype=torch.uint8) if rank == 0 else torch.zeros(16, dtype=torch.uint8)
        (group.send([t], 1, 0) if rank == 0 else group.recv([t], 0, 0)).wait()
        out[rank] = t

    threads = [threading.Thread(target=member, args=a) for a in ((0, remote), (1, held))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert torch.equal(out[1], torch.arange(16, dtype=torch.uint8))
