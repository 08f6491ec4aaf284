"""The prefill worker: an engine in prefill-only mode and a KV sender (DESIGN §2, steps 3-4).

Life of a job, keyed by the router's `transfer_id`:
1. RECEIVED      `submit(order)` checks the order in the caller's thread (ValueError: nothing
                 held), hands it to the engine loop and returns at once: no call stays open
                 for the job; its outcome goes to the router's stream (`notify_endpoint`).
2. QUEUED        the loop adds it to the engine and opens the transfer (`sender.begin`), so
                 the handshake with the decode worker runs while the job waits.
3. PREFILLING    the engine runs its chunks under the step's token budget. Before each step
                 a per-layer hook is armed: as soon as layer L is computed, its K/V for the
                 job's tokens go to the sender, whose I/O thread stages and sends them while
                 layer L+1 computes. Tokens served by the prefix cache are sent from the
                 cache with the first chunk; a range already sent is never sent again
                 (preemption recomputes). Positions below `order.kv_start`, which the
                 decode worker's prefix cache holds, are computed but never sent: every
                 layer's frames cover [kv_start, prompt length) only.
4. TRANSFERRING  the step that computes the last prompt token samples the first token, and
                 `sender.finish` carries it and a hand-off note (prefix hits, prefill
                 stamps) to the decode worker. The job keeps its blocks until the ack.
5. DONE          the receiver acknowledged every layer: the engine frees the blocks (full
                 ones stay in its prefix cache), the outcome (status, stamps) goes to the
                 router; the transfer is released.
   HELD          the sender reports FAILED once the prefill began (receiver gone, handshake
                 refused, no ack within `ack_timeout_s`, the reservation ended): the job
                 keeps its KV, computing on if midway, and reports HELD. An order with
                 `resend_of` naming it moves it to a new transfer (back to 3 or 4; nothing
                 is computed again); else it ends `hold_s` after its prefill did, or on abort.
   FAILED        the order was refused, the engine failed its computation, or the transfer
                 failed while it was still QUEUED: the engine drops the job, the outcome says
                 why.
   ABORTED       `abort(transfer_id)` before the end: the engine drops the job and the
                 receiver is told.
In every end state the job holds no engine block and no open transfer.

Threading: the public methods are thread-safe and never wait for a step; the engine, the
job table and the sender's per-step calls live on the engine loop's thread (worker.loop).
"""

from __future__ import annotations

import time

from pdserve.engine import Engine
from pdserve.kvtransfer.transports import make_sender
from pdserve.prefill_worker.jobs import PrefillJobs
from pdserve.protocol import PrefillOrder, WorkerRole
from pdserve.worker.base import Worker, publisher_for
from pdserve.worker.config import WorkerConfig


def prefill_jobs(config: WorkerConfig, engine: Engine) -> PrefillJobs:
    """The prefill role's job table on `engine`, with its KV sender."""
    sender = make_sender(config.transport, config.kv_spec, device=config.engine.device,
                         handshake_timeout_s=config.handshake_timeout_s,
                         ack_timeout_s=config.ack_timeout_s,
                         keepalive_s=config.keepalive_s, curve=config.curve)
    return PrefillJobs(engine, sender, publisher_for(config), config.hold_s)


class PrefillWorker(Worker):
    role = WorkerRole.PREFILL

    def __init__(self, config: WorkerConfig):
        super().__init__(config, {WorkerRole.PREFILL: prefill_jobs})

    def submit(self, order: PrefillOrder) -> bool:
        """Queue a prefill job and return; its PrefillOutcome reaches `order.notify_endpoint`
        once it ends. True when the order resumes the live job `order.resend_of` (its KV
        goes to the order's endpoint without being computed again), False when the prompt
        is computed. Raises ValueError for an order this engine could never run and
        RuntimeError once the worker is closed; nothing is held then."""
        self.engine.validate(order.prompt_token_ids, order.sampling)
        received = time.time()
        sender, tid = self._jobs.sender, order.transfer_id
        resume = bool(order.resend_of) and self._jobs.claim(order)
        # Begun here, not on the loop thread: a step in progress may take longer than the
        # decode side's lease, and the keep-alives that hold it start with the transfer.
        try:
            sender.begin(tid, order.kv_endpoint, len(order.prompt_token_ids), order.kv_start)
            begun = True
        except ValueError:  # the id is live here already: the job table reports the refusal
            begun = False
        try:
            self._apply(lambda: self._jobs.add(order, received, begun, resume))
        except BaseException:
            if begun:
                sender.release(tid)
            if resume:
                self._jobs.unclaim(order.resend_of)
            raise
        return resume and begun
