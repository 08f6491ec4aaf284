"""A worker survives any request: parameters that once produced NaN (temperature 1e-38) are
served, and a job whose computation fails (NaN logits, a failed forward; injected from
outside a real engine, tests/faults.py) ends alone with its cause on the stream, while the
worker stays healthy and serves the next request. Workers run in this process, as Ray
hosts them, so the test can reach their engines."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from driver import run_colocated, run_disaggregated
from faults import Faults
from helpers import greedy
from worker_driver import wait_idle
from worker_procs import worker_config

from pdserve.decode_worker import ColocatedWorker, DecodeWorker
from pdserve.engine import LLM, SamplingParams
from pdserve.prefill_worker import PrefillWorker
from pdserve.protocol import FinishReason, PrefillStatus, WorkerRole

PROMPT = [3, 1, 4, 1, 5]
OTHER = list(range(10, 40))
MAX_TOKENS = 8
NAN = "sampling failed: the logits hold NaN/inf"


@pytest.fixture(scope="module")
def workers(tiny_llama_dir):
    c = ColocatedWorker(worker_config(WorkerRole.COLOCATED, tiny_llama_dir, "c"))
    p = PrefillWorker(worker_config(WorkerRole.PREFILL, tiny_llama_dir, "p"))
    d = DecodeWorker(worker_config(WorkerRole.DECODE, tiny_llama_dir, "d"))
    yield dict(c=c, p=p, d=d)
    for w in (c, p, d):
        w.close()


@pytest.fixture(scope="module")
def faults(workers) -> dict[str, Faults]:
    return {name: Faults(w.engine) for name, w in workers.items()}


@pytest.fixture(scope="module")
def expected(tiny_llama_dir) -> dict[str, list[int]]:
    llm = LLM(str(tiny_llama_dir), block_size=4)
    outs = llm.generate([PROMPT, OTHER], greedy(MAX_TOKENS))
    return {"prompt": outs[0].token_ids, "other": outs[1].token_ids}


@pytest.fixture(autouse=True)
def healthy_and_idle(workers):
    """Every test ends with each worker's loop alive and every block free."""
    yield
    for w in workers.values():
        wait_idle(w)
        assert w.load().error == ""


def _serves_next(collector, workers, expected, tag: str) -> None:
    c, p, d = workers["c"], workers["p"], workers["d"]
    assert run_colocated(collector, c, f"{tag}-next-c", OTHER,
                         greedy(MAX_TOKENS)).token_ids == expected["other"]
    assert run_disaggregated(collector, p, d, f"{tag}-next-pd", OTHER,
                             greedy(MAX_TOKENS)).token_ids == expected["other"]


def test_temperature_1e_38_is_served_greedily_colocated_and_1p1d(collector, workers,
                                                                 expected):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1e-38)
    out = run_colocated(collector, workers["c"], "tiny-t-c", PROMPT, params)
    assert out.finish is FinishReason.LENGTH and out.token_ids == expected["prompt"]
    out = run_disaggregated(collector, workers["p"], workers["d"], "tiny-t-pd", PROMPT, params)
    assert out.finish is FinishReason.LENGTH and out.token_ids == expected["prompt"]
    assert out.prefill.status is PrefillStatus.DONE
    _serves_next(collector, workers, expected, "tiny-t")


def test_nan_logits_on_a_colocated_worker_fail_that_job_alone(collector, workers, faults,
                                                              expected):
    faults["c"].nan_logits("nan-c", after_tokens=2)
    with ThreadPoolExecutor(2) as pool:  # in the same batches
        bad = pool.submit(run_colocated, collector, workers["c"], "nan-c", PROMPT,
                          greedy(MAX_TOKENS))
        good = pool.submit(run_colocated, collector, workers["c"], "nan-c-ok", OTHER,
                           greedy(MAX_TOKENS))
        bad, good = bad.result(), good.result()
    assert bad.finish is FinishReason.ERROR and bad.error == NAN
    assert bad.token_ids == expected["prompt"][:2]
    assert good.finish is FinishReason.LENGTH and good.token_ids == expected["other"]
    _serves_next(collector, workers, expected, "nan-c")


@pytest.mark.parametrize("fault, reason", [
    ("nan", NAN),
    ("raise", "model step failed: InjectedFault: injected forward fault"),
])
def test_a_failed_prefill_is_reported_on_both_sides(collector, workers, faults, expected,
                                                    fault, reason):
    tid = f"prefill-{fault}"
    if fault == "nan":
        faults["p"].nan_logits(tid)
    else:
        faults["p"].raise_in_forward(tid)
    out = run_disaggregated(collector, workers["p"], workers["d"], tid, PROMPT,
                            greedy(MAX_TOKENS))
    assert out.prefill.status is PrefillStatus.FAILED and out.prefill.reason == reason
    assert out.finish is FinishReason.ERROR and reason in out.error  # the decode side's end
    assert out.token_ids == []
    _serves_next(collector, workers, expected, tid)


def test_nan_logits_mid_decode_fail_the_job_on_the_decode_worker(collector, workers, faults,
                                                                 expected):
    faults["d"].nan_logits("nan-d", after_tokens=3)
    out = run_disaggregated(collector, workers["p"], workers["d"], "nan-d", PROMPT,
                            greedy(MAX_TOKENS))
    assert out.prefill.status is PrefillStatus.DONE
    assert out.finish is FinishReason.ERROR and out.error == NAN
    assert out.token_ids == expected["prompt"][:3]
    _serves_next(collector, workers, expected, "nan-d")
