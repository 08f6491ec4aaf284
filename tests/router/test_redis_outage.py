"""Redis dies under a real 1P1D cluster (worker processes, SmolLM2, real redis-server) and a
new, empty one takes its port; and the router's event loop stalls for longer than the
heartbeat TTL. Neither costs a request or a worker: the router serves on its last view, the
workers' heartbeats keep trying, re-register and re-publish their prefix blocks, and every
block ends free."""

from __future__ import annotations

import argparse
import ctypes
import logging
import threading
import time

import grpc
import pytest
import redis
from helpers import wait_for
from rpc_helpers import collect, greedy_request, stub_for, wait_cluster_idle

from pdserve.deploy.client_cmds import cmd_status
from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.redis_server import RedisServer
from pdserve.deploy.spec import ClusterSpec
from pdserve.engine import SamplingParams
from pdserve.protocol import WorkerRecord, block_hashes
from pdserve.router.registry import prefix_hits, prefix_key, worker_key
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
ALWAYS, NEVER = pb.DISAGGREGATION_ALWAYS, pb.DISAGGREGATION_NEVER
TTL_S = 1.5
WORKERS = {"prefill-0", "decode-0"}
# more than two blocks of 16 tokens, so the prefill worker's cache indexes some
PROMPT = ("The history of the printing press begins in the fifteenth century, when a "
          "goldsmith in Mainz combined movable metal type, oil-based ink and a screw press")


EXPIRY_EVENTS = {"notify-keyspace-events": "Ex"}


class Redis:
    """The cluster's Redis, which a test may replace; the fixture stops the last one."""

    def __init__(self):
        # expiry events: a test watches that no worker entry expires (CONFIG SET is gone)
        self.server = RedisServer(settings=EXPIRY_EVENTS)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, socket_timeout=2)


@pytest.fixture(scope="module")
def setup():
    box = Redis()
    spec = ClusterSpec(prefill=1, decode=1, num_blocks=256, heartbeat_s=0.2,
                       heartbeat_ttl_s=TTL_S, router=RouterConfig(refresh_s=0.2))
    try:
        cluster = LocalCluster(spec, redis_url=box.server.url)
    except BaseException:
        box.server.stop()
        raise
    yield cluster, box
    cluster.close()
    box.server.stop()


@pytest.fixture(scope="module")
def want(smollm2_llm):
    return smollm2_llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0))[0]


def listed(router) -> set[str]:
    return set(router.router.view.workers)


def index_of(box: Redis, hashes) -> dict[int, set[bytes]]:
    """The prefix index over `hashes`: which workers each block is listed under."""
    with box.client() as c:
        return {h: c.smembers(prefix_key(h)) for h in hashes}


def records(box: Redis) -> dict[str, WorkerRecord]:
    with box.client() as c:
        raw = {w: c.hgetall(worker_key(w)) for w in WORKERS}
    return {w: WorkerRecord.from_fields(r) for w, r in raw.items() if r}


class Stream:
    """A greedy request streaming in a thread; `outcome` is (code, text, ids) once done."""

    def __init__(self, stub, request):
        self.outcome: tuple | None = None
        self.started = threading.Event()

        def run():
            text, ids = "", []
            try:
                for response in stub.Generate(request, timeout=120):
                    if response.HasField("chunk"):
                        text += response.chunk.text
                        ids += response.chunk.token_ids
                        self.started.set()
                self.outcome = (grpc.StatusCode.OK, text, ids)
            except grpc.RpcError as e:
                self.outcome = (e.code(), e.details(), ids)
            finally:
                self.started.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def result(self, timeout: float = 120) -> tuple:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream hangs"
        return self.outcome


def test_a_dead_redis_and_an_empty_new_one_cost_no_request_and_no_worker(
        setup, want, smollm2_llm, capsys):
    cluster, box = setup
    router = cluster.routers[0]
    stub = stub_for(cluster.address)
    hashes = block_hashes(router.router.tokenizer.encode(PROMPT), cluster.spec.block_size)
    assert len(hashes) >= 2

    text, ids, final = collect(stub, greedy_request(PROMPT, 12, disaggregation=ALWAYS))
    assert (text, ids) == (want.text, want.token_ids) and final.prefill_worker == "prefill-0"
    before = wait_for(lambda: (i := index_of(box, hashes)) and all(i.values()) and i, 10,
                      "the prompt's blocks in the prefix index")
    assert all(b"prefill-0" in workers for workers in before.values())

    long = greedy_request(PROMPT, 48, disaggregation=ALWAYS)
    long.sampling.ignore_eos = True
    want_long = smollm2_llm.generate(
        [PROMPT], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))[0]
    streaming = Stream(stub, long)
    assert streaming.started.wait(60)

    port = box.server.port
    box.server.kill()
    wait_for(lambda: router.router.view.unreachable_since is not None, 10,
             "the router to notice the outage")
    # served on the last view, prefix-blind, with the same greedy output, in both modes
    for mode in (ALWAYS, NEVER):
        assert collect(stub, greedy_request(PROMPT, 12, disaggregation=mode))[:2] == (
            want.text, want.token_ids)
        assert listed(router) == WORKERS
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5)
    assert {w.worker_id for w in status.workers} == WORKERS
    wait_for(lambda: time.time() - max(w.last_heartbeat for w in status.workers) > 2, 15,
             "heartbeats the router holds to age", poll_s=0.2)
    args = argparse.Namespace(target=cluster.address, timeout=5.0, stale_after=2.0)
    assert cmd_status(args) == 0
    out, err = capsys.readouterr()
    assert all(w in out for w in WORKERS) and "cannot read the registry" in err

    # brand new and empty, on the same address (with the same password)
    box.server = RedisServer(port=port, password=box.server.password, settings=EXPIRY_EVENTS)
    wait_for(lambda: set(records(box)) == WORKERS, 15, "the workers to register again")
    wait_for(lambda: index_of(box, hashes) == before, 15, "the prefix index to be re-published")
    wait_for(lambda: router.router.view.unreachable_since is None, 10, "the router to read again")
    assert listed(router) == WORKERS
    beats = {w: r.heartbeat for w, r in records(box).items()}
    wait_for(lambda: all(r.heartbeat > beats[w] for w, r in records(box).items()), 10,
             "every heartbeat to go on")  # no heartbeat thread gave up

    code, text, ids = streaming.result()
    assert code == grpc.StatusCode.OK, text
    assert (text, ids) == (want_long.text, want_long.token_ids)
    text, ids, final = collect(stub, greedy_request(PROMPT, 12, disaggregation=ALWAYS))
    assert (text, ids) == (want.text, want.token_ids) and final.prefill_worker == "prefill-0"

    assert router.call(_prefix_hits(router, hashes)).get("prefill-0") == len(hashes)
    assert listed(router) == WORKERS
    wait_cluster_idle(cluster)


async def _prefix_hits(router, hashes) -> dict[str, int]:
    return await prefix_hits(router.router.redis, hashes)


def test_a_stalled_router_evicts_no_worker_whose_heartbeats_kept_landing(
        setup, want, caplog):
    """The router's loop holds the GIL (as tokenizing a huge prompt does) for longer than
    the heartbeat TTL, while a request streams. The workers beat from their own processes:
    Redis lets no worker entry expire meanwhile (its expiry events say so), and afterwards
    both are still listed, the request finished and new ones run."""
    cluster, box = setup
    router = cluster.routers[0]
    stub = stub_for(cluster.address)
    wait_for(lambda: listed(router) == WORKERS, 15, "both workers listed")
    watcher = box.client()
    expiries = watcher.pubsub()
    expiries.psubscribe("__keyevent@*__:expired")
    assert wait_for(lambda: expiries.get_message(timeout=0.1), 5, "the subscription")
    long = greedy_request(PROMPT, 48, disaggregation=ALWAYS)
    long.sampling.ignore_eos = True
    streaming = Stream(stub, long)
    assert streaming.started.wait(60)

    async def stall():
        # libc sleep through PyDLL keeps the GIL: no thread of this process runs meanwhile
        ctypes.PyDLL(None).sleep(int(3 * TTL_S) + 1)

    with caplog.at_level(logging.WARNING, logger="pdserve.router.view"):
        router.call(stall())
        code, text, _ = streaming.result()
        assert code == grpc.StatusCode.OK, text
        assert collect(stub, greedy_request(PROMPT, 12, disaggregation=ALWAYS))[:2] == (
            want.text, want.token_ids)
        router.call(router.router.view.refresh())
    expired = []
    while (message := expiries.get_message(timeout=0.2)) is not None:
        expired.append(message["data"])
    expiries.close()
    watcher.close()
    assert not [k for k in expired if k.startswith(b"pdserve:worker:")], expired
    assert listed(router) == WORKERS
    assert not [r for r in caplog.records if "left the view" in r.getMessage()]
    wait_cluster_idle(cluster)


def test_status_of_a_router_that_is_gone_fails_in_bounded_time(capsys):
    started = time.monotonic()
    args = argparse.Namespace(target="127.0.0.1:1", timeout=2.0, stale_after=5.0)
    assert cmd_status(args) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err
