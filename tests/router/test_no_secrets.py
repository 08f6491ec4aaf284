"""No secret leaves where it belongs: with API keys, CURVE on the data plane and the
embedded Redis's password, a cluster serves requests, refuses a wrong key and reports its
status, and none of the key material is in its logs (this process's and the worker
processes'), its error messages, `pdserve status`, or anything stored in the registry."""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc
import pytest
import redis

from pdserve.deploy.client_cmds import cmd_status
from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec, CurveMode
from pdserve.router.router import RouterConfig
from pdserve.router.security import ApiSecurity
from pdserve.rpc.client import PdServeClient
from pdserve.rpc.credentials import Credentials

pytestmark = pytest.mark.slow

KEY = "sk-never-shown-7c5e2a91d4"


def _registry_dump(url: str) -> str:
    """Every key and value in the registry's Redis, as text."""
    client = redis.Redis.from_url(url)
    out = []
    try:
        for key in client.scan_iter():
            kind = client.type(key).decode()
            value = {"hash": client.hgetall, "string": client.get, "set": client.smembers,
                     "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
                     "list": lambda k: client.lrange(k, 0, -1)}[kind](key)
            out.append(f"{key!r} {value!r}")
    finally:
        client.close()
    assert out, "the registry is empty: nothing was checked"
    return "\n".join(out)


def test_no_key_material_in_logs_status_errors_or_the_registry(caplog, capfd):
    caplog.set_level(logging.DEBUG)
    spec = ClusterSpec(prefill=1, decode=1, num_blocks=128, curve=CurveMode.ON,
                       router=RouterConfig(security=ApiSecurity.from_keys([KEY])))
    cluster = LocalCluster(spec)
    try:
        keys = cluster.spec.curve_keys
        secrets = [KEY, cluster._redis.password,
                   keys.server_secret.decode(), keys.client_secret.decode()]

        async def calls():
            async with PdServeClient.with_credentials(cluster.address, Credentials(KEY)) as c:
                parts = [p async for p in c.generate("The capital of France is",
                                                     max_tokens=4, timeout=60,
                                                     disaggregation="always")]
            async with PdServeClient.with_credentials(cluster.address,
                                                      Credentials(KEY[:-1])) as c:
                try:
                    await c.cluster_status(timeout=10)
                except grpc.aio.AioRpcError as e:
                    return parts, e
            raise AssertionError("a wrong key was let in")

        parts, refused = asyncio.run(calls())
        assert parts and refused.code() is grpc.StatusCode.UNAUTHENTICATED
        final = parts[-1].final
        assert final.kv_transfer_bytes > 0  # the KV went over the CURVE data plane
        args = argparse.Namespace(target=cluster.address, timeout=10.0, stale_after=5.0,
                                  api_key=KEY, tls_ca=None, tls_cert=None, tls_key=None)
        assert cmd_status(args) == 0
        registry = _registry_dump(cluster.redis_url)
    finally:
        cluster.close()
    out, err = capfd.readouterr()  # the worker processes log to the inherited stderr
    assert "decode-0" in out  # the status table
    seen = "\n".join([out, err, registry, refused.details() or "", repr(cluster.spec),
                      *(r.getMessage() for r in caplog.records)])
    print("LEN", len(out), len(err), len(registry), err[:600], file=open("/tmp/seen.txt","w"))
    assert not [s for s in secrets if s in seen]
