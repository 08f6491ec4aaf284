"""1P1D in worker processes with the cluster's CURVE keys: while requests run, peers without
the cluster's client key knock at the decode worker's KV endpoint and at the stream's
endpoint and never get past the ZMTP handshake; every output equals engine.LLM's, every
block is free afterwards, and no secret key shows in a config or a log record."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import zmq
from curve_helpers import OUTSIDERS, connect_and_judge, outsider_socket
from driver import run_many
from helpers import greedy
from worker_driver import wait_idle
from worker_procs import spawn, stop_all, worker_config

from pdserve.bench.stream_collector import StreamCollector
from pdserve.deploy.spec import make_curve_keys
from pdserve.engine import LLM
from pdserve.kvtransfer.messages import Handshake, encode
from pdserve.protocol import WorkerRole

KEYS = make_curve_keys()
MAX_TOKENS = 8
FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 40, 90, 160)]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def configs(tiny_llama_dir):
    return [worker_config(role, tiny_llama_dir, worker_id, curve_keys=KEYS)
            for role, worker_id in ((WorkerRole.PREFILL, "p0"), (WorkerRole.DECODE, "d0"))]


@pytest.fixture(scope="module")
def procs(configs):
    procs = spawn(configs)
    yield procs
    stop_all(procs)


def test_outsiders_are_refused_while_transfers_complete(procs, configs, tiny_llama_dir,
                                                        caplog):
    caplog.set_level(logging.DEBUG)
    prefill, decode = procs
    collector = StreamCollector(curve=KEYS)
    try:
        outs: list = []
        run = threading.Thread(target=lambda: outs.extend(run_many(
            collector, [prefill.worker], [decode.worker], PROMPTS, greedy(MAX_TOKENS), "kv")))
        run.start()
        # a handshake built from the public model shape, then a forged frame header
        knock = [[encode(Handshake("m", 2, 2, 8, "float32"))], [b"\x93\x03\xa9kv-0/0000"]]
        verdicts = []
        for how in OUTSIDERS:
            for endpoint, kind in ((decode.worker.kv_endpoint(), zmq.DEALER),
                                   (collector.endpoint, zmq.DEALER),
                                   (collector.endpoint, zmq.PUSH)):
                sock = outsider_socket(kind, how, KEYS)
                try:
                    verdicts.append(connect_and_judge(sock, endpoint, knock))
                finally:
                    sock.close()
        run.join(120)
        assert not run.is_alive()
        assert all(v in FAILED for v in verdicts), verdicts
        expected = [o.token_ids for o in LLM(str(tiny_llama_dir), block_size=4, num_blocks=512)
                    .generate(PROMPTS, greedy(MAX_TOKENS))]
        assert [o.token_ids for o in outs] == expected
        assert not collector.errors
    finally:
        collector.close()
    for p in procs:
        wait_idle(p.worker)
    secrets = [k.decode() for k in (KEYS.server_secret, KEYS.client_secret)]
    shown = [repr(c) for c in configs] + [r.getMessage() for r in caplog.records]
    assert not [s for s in shown if any(k in s for k in secrets)]
