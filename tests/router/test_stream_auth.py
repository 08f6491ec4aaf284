"""The router's token stream with the cluster's CURVE keys, on real loopback sockets: a
worker's publisher is heard, a peer without the cluster's client key never gets past the
ZMTP handshake, and a peer with it cannot add to a transfer that another connection owns.
No secret key reaches a log record or a config's repr."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import zmq
from curve_helpers import OUTSIDERS, connect_and_judge, insider_socket, outsider_socket

from pdserve.deploy.spec import ClusterSpec, CurveMode, make_curve_keys
from pdserve.protocol import TokenBatch, TokenChunk
from pdserve.protocol.stream import encode
from pdserve.router.router import RouterConfig
from pdserve.router.stream import StreamReader
from pdserve.worker.publisher import StreamPublisher

KEYS = make_curve_keys()
FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _batch(*chunks: TokenChunk) -> list[bytes]:
    return [encode(TokenBatch("w-forged", time.time(), chunks))]


async def _next(q: asyncio.Queue) -> TokenChunk:
    return await asyncio.wait_for(q.get(), 10)  # bounds a failure, never waited out


def test_outsiders_are_refused_and_a_keyed_intruder_cannot_inject(caplog):
    caplog.set_level(logging.DEBUG)

    async def main():
        reader = StreamReader(curve=KEYS)
        reader.start()
        publisher = StreamPublisher("w0", curve=KEYS)
        intruder = insider_socket(zmq.DEALER, KEYS)
        outsiders = [outsider_socket(zmq.PUSH, "plain", KEYS)] + [
            outsider_socket(zmq.DEALER, how, KEYS) for how in OUTSIDERS]
        try:
            live, own = reader.open("req/live"), reader.open("req/intruders-own")
            publisher.add_chunk(reader.endpoint, TokenChunk("req/live", (1, 2)))
            publisher.flush()
            assert (await _next(live)).token_ids == (1, 2)  # "req/live" is w0's connection's
            forged = _batch(TokenChunk("req/live", (666,), stamps=None))
            for sock in outsiders:
                verdict = await asyncio.to_thread(connect_and_judge, sock, reader.endpoint,
                                                  [forged])
                assert verdict in FAILED
            # the intruder's forgery, then a chunk of a transfer it owns: once that one is
            # read, so was the forgery (one connection's messages arrive in order)
            await asyncio.to_thread(connect_and_judge, intruder, reader.endpoint,
                                    [forged, _batch(TokenChunk("req/intruders-own", (5,)))])
            assert (await _next(own)).token_ids == (5,)
            assert reader.num_foreign == 1 and live.empty()
            publisher.add_chunk(reader.endpoint, TokenChunk("req/live", (3,)))
            publisher.flush()
            assert (await _next(live)).token_ids == (3,)
            assert reader.num_foreign == 1 and live.empty()
        finally:
            for sock in [intruder, *outsiders]:
                sock.close()
            publisher.close()
            await reader.close()

    asyncio.run(main())
    secrets = (KEYS.server_secret, KEYS.client_secret)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records and not any(s.decode() in text for s in secrets)


def test_configs_never_show_the_secret_keys():
    spec = ClusterSpec(curve=CurveMode.ON, router=RouterConfig(curve=KEYS)).secured(())
    shown = [repr(spec.curve_keys), str(spec.curve_keys), repr(spec), repr(spec.router)]
    for secret in (spec.curve_keys.server_secret, spec.curve_keys.client_secret,
                   KEYS.server_secret, KEYS.client_secret):
        assert not any(secret.decode() in s or str(secret) in s for s in shown)
    assert spec.curve_keys.server_public[:8].decode() in repr(spec.curve_keys)


@pytest.mark.parametrize("mode,hosts,keyed", [
    (CurveMode.AUTO, ["127.0.0.1", "localhost", "::1"], False),
    (CurveMode.AUTO, ["127.0.0.1", "10.1.2.3"], True),
    (CurveMode.AUTO, ["0.0.0.0"], True),
    (CurveMode.ON, ["127.0.0.1"], True),
    (CurveMode.OFF, ["10.1.2.3"], False),
])
def test_keys_are_made_where_the_data_plane_leaves_the_machine(mode, hosts, keyed):
    spec = ClusterSpec(curve=mode).secured(hosts)
    assert (spec.curve_keys is not None) == keyed
    assert spec.secured(hosts) is spec  # made once: every member gets the same keys
