"""An abort is final for its transfer id (worker.base, Tombstones): an order that reaches a
worker after its abort (a call that timed out on a hung worker, applied when it resumed,
after the abort sent on another connection) is ended at once, holding nothing; the
transfer ids of other orders are untouched."""

from __future__ import annotations

import pytest
from driver import reserve, run_disaggregated, submit
from helpers import greedy
from worker_driver import wait_idle
from worker_procs import worker_config

from pdserve.decode_worker import ColocatedWorker, DecodeWorker
from pdserve.prefill_worker import PrefillWorker
from pdserve.protocol import DecodeOrder, FinishReason, PrefillStatus, WorkerRole

PROMPT = (3, 1, 4, 1, 5, 9, 2, 6)


@pytest.fixture(scope="module")
def workers(tiny_llama_dir):
    p = PrefillWorker(worker_config(WorkerRole.PREFILL, tiny_llama_dir, "p"))
    d = DecodeWorker(worker_config(WorkerRole.DECODE, tiny_llama_dir, "d"))
    c = ColocatedWorker(worker_config(WorkerRole.COLOCATED, tiny_llama_dir, "c"))
    yield p, d, c
    for w in (p, d, c):
        w.close()


@pytest.fixture(autouse=True)
def no_leaks(workers):
    yield
    for w in workers:
        wait_idle(w)


def test_a_local_order_after_its_abort_ends_at_once(collector, workers):
    _, d, c = workers
    for worker in (d, c):
        tid = f"late-local-{worker.worker_id}"
        worker.abort(tid)
        worker.generate(DecodeOrder(tid, PROMPT, greedy(500, ignore_eos=True),
                                    collector.endpoint))
        final = collector.wait_final(tid).final
        assert final.finish is FinishReason.ABORT and "before the order" in final.error


def test_a_disaggregated_order_after_its_aborts_ends_on_both_sides(collector, workers):
    p, d, _ = workers
    p.abort("late-pd")
    d.abort("late-pd")
    submit(collector, p, "late-pd", PROMPT, greedy(4),
           reserve(collector, d, "late-pd", PROMPT, greedy(4)))
    outcome = collector.wait_outcome("late-pd")
    assert outcome.status is PrefillStatus.ABORTED and outcome.stamps.prefill_start == 0.0
    final = collector.wait_final("late-pd").final  # its own tombstone or the sender's abort
    assert final.finish in (FinishReason.ABORT, FinishReason.ERROR)
    assert final.stamps.kv_received == 0.0


def test_other_transfer_ids_are_served(collector, workers):
    p, d, _ = workers
    d.abort("never-ordered")
    out = run_disaggregated(collector, p, d, "served", PROMPT, greedy(4))
    assert out.finish is FinishReason.LENGTH and len(out.token_ids) == 4
