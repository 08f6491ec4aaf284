"""Scheduler bookkeeping driven by fake tokens (no model): budgets, order, preemption,
aborts and reservations. Every test ends with nothing leaked."""

from __future__ import annotations

import pytest

from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError
from pdserve.engine.config import EngineMode, SchedulerConfig
from pdserve.engine.request import Request, RequestStatus, SamplingParams
from pdserve.engine.scheduler import ScheduledBatch, Scheduler


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=16,
                   mode=EngineMode.MIXED, eos=(0,)) -> Scheduler:
    return Scheduler(SchedulerConfig(mode=mode, max_num_batched_tokens=budget,
                                     max_num_seqs=max_seqs),
                     BlockManager(num_blocks, block_size), max_model_len=1024,
                     eos_token_ids=eos)


def fake_token(request: Request) -> int:
    """A deterministic 'model': the next token depends on the whole context."""
    return 1 + sum((i + 1) * t for i, t in enumerate(request.all_token_ids)) % 97


def fake_step(s: Scheduler) -> ScheduledBatch:
    batch = s.schedule()
    assert batch.num_tokens <= s.config.max_num_batched_tokens
    s.update(batch, [fake_token(i.request) if i.samples else None for i in batch.requests])
    return batch


def req(rid: str, n: int, max_tokens: int = 4, **kw) -> Request:
    return Request(rid, [(7 * i + len(rid)) % 50 + 1 for i in range(n)],
                   SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))


def drain(s: Scheduler, limit: int = 1000) -> None:
    for _ in range(limit):
        if not s.has_work():
            return
        fake_step(s)
    raise AssertionError("scheduler did not drain")


def assert_empty(s: Scheduler) -> None:
    assert not s.requests and not s.waiting and not s.running and not s.reserved
    bm = s.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_long_prompt_is_chunked_by_the_budget():
    s = make_scheduler(budget=32)
    s.add(req("long", 100, max_tokens=2))
    chunks = [fake_step(s).requests[0].num_new_tokens for _ in range(4)]
    assert chunks == [32, 32, 32, 4]
    assert s.requests["long"].num_output_tokens == 1
    drain(s)
    assert_empty(s)


def test_decodes_go_first_and_prefill_fills_the_rest():
    s = make_scheduler(budget=16)
    for i in range(3):
        s.add(req(f"d{i}", 4, max_tokens=20))
    fake_step(s)  # all three prefill together (12 tokens)
    s.add(req("p", 40, max_tokens=2))
    batch = fake_step(s)
    sizes = {i.request.request_id: i.num_new_tokens for i in batch.requests}
    assert sizes == {"d0": 1, "d1": 1, "d2": 1, "p": 13}
    drain(s)
    assert_empty(s)


def test_max_num_seqs_caps_the_running_batch():
    s = make_scheduler(max_seqs=2)
    for i in range(5):
        s.add(req(f"r{i}", 3, max_tokens=5))
    fake_step(s)
    assert len(s.running) == 2 and len(s.waiting) == 3
    drain(s)
    assert_empty(s)


def test_preemption_under_block_pressure_completes_everything():
    s = make_scheduler(num_blocks=10, block_size=4, budget=64)
    for i in range(4):
        s.add(req("r" * (i + 1), 6, max_tokens=12))  # distinct prompts; 5 blocks each at the end
    finished = {}
    for _ in range(500):
        if not s.has_work():
            break
        batch = s.schedule()
        for victim in batch.preempted:
            assert victim.status is RequestStatus.WAITING and not victim.block_ids
        bm, bs = s.block_manager, s.block_manager.block_size
        for item in batch.requests:  # blocks written this step belong to one request only
            written = item.request.block_ids[item.start // bs : (item.end - 1) // bs + 1]
            assert all(bm.ref_count(b) == 1 for b in written)
        s.update(batch, [fake_token(i.request) if i.samples else None for i in batch.requests])
        for r in list(batch.requests):
            if r.request.status.is_finished:
                finished[r.request.request_id] = r.request.output_token_ids
    assert s.num_preemptions > 0
    assert sorted(finished) == ["r", "rr", "rrr", "rrrr"]
    assert all(len(t) == 12 for t in finished.values())
    assert_empty(s)


def test_preempted_request_recomputes_to_the_same_tokens():
    alone = make_scheduler(num_blocks=64)
    alone.add(req("x", 6, max_tokens=12))
    drain(alone)
    tight = make_scheduler(num_blocks=8)
    x = req("x", 6, max_tokens=12)
    tight.add(req("a", 6, max_tokens=12))
    tight.add(x)
    drain(tight)
    assert tight.num_preemptions > 0
    ref = req("x", 6, max_tokens=12)
    s = make_scheduler(num_blocks=64)
    s.add(ref)
    drain(s)
    assert x.output_token_ids == ref.output_token_ids
    assert_empty(tight)


@pytest.mark.parametrize("stage", ["waiting", "prefilling", "decoding"])
def test_abort_at_each_stage_frees_everything(stage):
    s = make_scheduler(budget=8)
    s.add(req("other", 5, max_tokens=30))
    s.add(req("x", 20, max_tokens=30))
    if stage != "waiting":
        fake_step(s)  # x gets a 3-token chunk
        assert s.requests["x"].status is RequestStatus.RUNNING
    if stage == "decoding":
        while s.requests["x"].is_prefilling:
            fake_step(s)
    assert s.abort("x") is True
    assert s.abort("x") is False  # idempotent
    drain(s)
    assert_empty(s)


def test_eos_stop_tokens_and_lengths():
    s = make_scheduler(eos=(5,))
    a, b, c = req("a", 3, 10), req("b", 3, 10, stop_token_ids=(6,)), req("c", 3, 10,
                                                                          ignore_eos=True)
    for r in (a, b, c):
        s.add(r)
    batch = s.schedule()
    outs = s.update(batch, [5, 6, 5])
    assert [(o.finished, o.finish_reason.value if o.finish_reason else None) for o in outs] == [
        (True, "stop"), (True, "stop"), (False, None)]
    drain(s)
    assert c.status is RequestStatus.FINISHED_LENGTH and c.num_output_tokens == 10
    assert_empty(s)


def test_prefill_only_mode_finishes_after_the_first_token():
    s = make_scheduler(mode=EngineMode.PREFILL_ONLY, budget=8)
    r = req("p", 20, max_tokens=50)
    s.add(r)
    drain(s)
    assert r.status is RequestStatus.FINISHED_PREFILLED and r.num_output_tokens == 1
    assert_empty(s)


def packing_scheduler(pack, mode=EngineMode.PREFILL_ONLY) -> Scheduler:
    return Scheduler(SchedulerConfig(mode=mode, max_num_batched_tokens=512,
                                     prefill_pack_tokens=pack),
                     BlockManager(1024, 4), max_model_len=1024, eos_token_ids=(0,))


def fresh(rid: str, n: int, seed: int) -> Request:
    """A prompt whose first block no other seed's shares (no prefix-cache hit)."""
    return Request(rid, [(31 * seed + 7 * i) % 50 + 1 for i in range(n)],
                   SamplingParams(max_tokens=1, temperature=0.0))


def step_sizes(s: Scheduler) -> dict[str, int]:
    return {i.request.request_id: i.num_new_tokens for i in fake_step(s).requests}


def test_a_prefill_step_packs_prompts_only_up_to_its_pack_limit():
    s = packing_scheduler(256)
    s.add(fresh("long-a", 300, 1))
    s.add(fresh("long-b", 200, 2))
    # the first runs alone: packing the second would give it the second's time too
    assert step_sizes(s) == {"long-a": 300}
    assert step_sizes(s) == {"long-b": 200}
    for i in range(10):  # short prompts share a step, up to the limit
        s.add(fresh(f"short-{i}", 20 + i, 3 + i))
    assert step_sizes(s) == {f"short-{i}": 20 + i for i in range(10)}  # 245 tokens
    s.add(fresh("head", 100, 20))
    s.add(fresh("next", 400, 21))
    s.add(fresh("after", 50, 22))
    # a chunk of the next would only delay the head's first token: it waits, whole, and
    # nothing passes it
    assert step_sizes(s) == {"head": 100}
    assert step_sizes(s) == {"next": 400}
    assert step_sizes(s) == {"after": 50}
    s.add(fresh("head2", 100, 23))
    s.add(fresh("fits", 150, 24))  # 250 tokens in all: one step
    assert step_sizes(s) == {"head2": 100, "fits": 150}
    drain(s)
    s.add(fresh("again", 300, 1))  # long-a's prompt: all but its last block cached
    s.add(fresh("head3", 200, 25))
    s.add(fresh("again2", 300, 1))
    assert step_sizes(s) == {"again": 4, "head3": 200, "again2": 4}  # what it computes
    drain(s)
    assert_empty(s)


@pytest.mark.parametrize(("pack", "mode"), [(None, EngineMode.PREFILL_ONLY),
                                            (256, EngineMode.MIXED)])
def test_without_a_pack_limit_or_beside_decodes_a_step_fills_its_budget(pack, mode):
    s = packing_scheduler(pack, mode)
    s.add(fresh("a", 300, 1))
    s.add(fresh("b", 200, 2))
    assert step_sizes(s) == {"a": 300, "b": 200}
    drain(s)
    assert_empty(s)
    with pytest.raises(ValueError, match="prefill_pack_tokens"):
        SchedulerConfig(prefill_pack_tokens=0)


def test_reserve_and_admit():
    s = make_scheduler(mode=EngineMode.DECODE_ONLY, num_blocks=8, block_size=4)
    r = req("x", 10, max_tokens=3)
    held = s.reserve(r)
    assert len(held.block_ids) == 3 and s.block_manager.num_free_blocks == 5
    assert held.num_cached_tokens == 0 and held.fresh_block_ids == tuple(held.block_ids)
    assert not s.has_work()  # reserved requests wait for their KV, they do not run
    with pytest.raises(NoFreeBlocksError):
        s.reserve(req("big", 30))
    with pytest.raises(ValueError, match="no reservation"):
        s.admit_prefilled("nope", 1)
    out = s.admit_prefilled("x", 42)
    assert out.new_token_ids == (42,) and not out.finished
    assert r.num_computed_tokens == 10 and r.status is RequestStatus.RUNNING
    drain(s)
    assert r.num_output_tokens == 3
    assert_empty(s)


def test_reserve_abort_and_first_token_finish():
    s = make_scheduler(mode=EngineMode.DECODE_ONLY, eos=(9,))
    s.reserve(req("a", 6))
    assert s.abort("a")
    s.reserve(req("b", 6))
    assert s.admit_prefilled("b", 9).finished  # EOS as the first token
    s.reserve(req("c", 6, max_tokens=1))
    assert s.admit_prefilled("c", 3).finish_reason.value == "length"
    assert_empty(s)


def test_reserve_needs_decode_mode():
    s = make_scheduler(mode=EngineMode.MIXED)
    with pytest.raises(ValueError, match="decode-only"):
        s.reserve(req("a", 4))
    assert_empty(s)
