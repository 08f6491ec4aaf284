"""The I/O threads' mailbox: a put wakes a sleeping owner at once, and writes the wake-up
pipe only then (not for every put of a busy step)."""

from __future__ import annotations

import threading
import time

import zmq
from helpers import wait_for

import pdserve.kvtransfer.mailbox as mailbox_module
from pdserve.kvtransfer.mailbox import Mailbox


def test_puts_to_an_awake_owner_write_nothing_and_a_sleeping_one_is_woken(monkeypatch):
    writes = []
    real_write = mailbox_module.os.write
    monkeypatch.setattr(mailbox_module.os, "write",
                        lambda fd, data: (writes.append(fd), real_write(fd, data))[1])
    box = Mailbox()
    poller = zmq.Poller()
    poller.register(box.fd, zmq.POLLIN)
    try:
        for i in range(30):  # a prefill step's sends while the owner is busy elsewhere
            box.put(i)
        assert writes == [] and box.take() == list(range(30))
        box.put("queued")  # queued before the owner sleeps: the poll does not sleep
        t0 = time.monotonic()
        box.poll(poller, 120_000)
        # far below the poll's timeout: it returned at once, however busy the machine
        assert time.monotonic() - t0 < 60 and box.take() == ["queued"] and writes == []

        woke = []
        owner = threading.Thread(target=lambda: woke.append(box.poll(poller, 120_000)))
        owner.start()
        wait_for(lambda: box._sleeping, 10, "the owner to sleep in poll")
        box.put("late")
        box.put("later")  # already signalled: no second write
        owner.join(60)  # woken, not timed out
        assert not owner.is_alive() and box.fd in woke[0]
        assert len(writes) == 1 and box.take() == ["late", "later"]
        assert box.poll(poller, 0) == {}  # the wake-up byte was drained
    finally:
        box.close()
