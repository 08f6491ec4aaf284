"""Who may call the router: API keys, TLS and mutual TLS on the gRPC and HTTP APIs, health
open to all, reflection and metrics behind the key unless made public, no secret in any
repr or log; and
`pdserve serve` refusing a non-loopback address without them. A router with no worker
(calls that pass the door end UNAVAILABLE), real Redis, certificates made here."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.bench.certs import make_pki
from pdserve.deploy.client_cmds import cmd_status
from pdserve.deploy.redis_server import RedisServer
from pdserve.deploy.router_thread import RouterThread
from pdserve.deploy.security_flags import exposure_refusal, is_loopback
from pdserve.models import DEFAULT_MODEL, resolve_model
from pdserve.router.http import HttpConfig
from pdserve.router.router import RouterConfig
from pdserve.router.security import ApiSecurity, read_keys
from pdserve.rpc import pdserve_pb2 as pb
from pdserve.rpc.client import PdServeClient
from pdserve.rpc.credentials import Credentials

KEY, OTHER_KEY = "sk-test-4f1c9a7e2b", "sk-second-8d02"
STATUS = "/pdserve.v1.PdServe/GetClusterStatus"
NONE = Credentials()


@pytest.fixture(scope="module")
def redis_server():
    s = RedisServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pki():
    return make_pki()


def router(redis_server, security: ApiSecurity) -> RouterThread:
    return RouterThread(RouterConfig(security=security), resolve_model(DEFAULT_MODEL),
                        redis_server.url, connect=lambda record: None,
                        http=HttpConfig(port=0, model_name="smollm2-135m"))


def http_get(url: str, key: str | None = None, context=None) -> tuple[int, dict | str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10, context=context) as reply:
            body = reply.read().decode()
            status = reply.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


@pytest.fixture(scope="module")
def keyed(redis_server):
    r = router(redis_server, ApiSecurity.from_keys([KEY, OTHER_KEY]))
    yield r
    r.close()


def status(address: str, credentials: Credentials = NONE) -> pb.ClusterStatus:
    async def run():
        async with PdServeClient.with_credentials(address, credentials) as client:
            return await client.cluster_status(timeout=10)
    return asyncio.run(run())


def generate(address: str, credentials: Credentials = NONE):
    async def run():
        async with PdServeClient.with_credentials(address, credentials) as client:
            return [p async for p in client.generate("Hi", max_tokens=2, timeout=10)]
    return asyncio.run(run())


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_a_call_without_the_key_or_with_a_wrong_one_is_unauthenticated(keyed):
    for credentials in (Credentials(), Credentials(api_key="sk-wrong")):
        for call in (lambda c=credentials: status(keyed.address, c),
                     lambda c=credentials: generate(keyed.address, c)):
            code, details = code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert details == "missing or invalid API key"  # nothing about which keys exist
    for key in (KEY, OTHER_KEY):
        assert list(status(keyed.address, Credentials(api_key=key)).workers) == []
        code, _ = code_of(lambda k=key: generate(keyed.address, Credentials(api_key=k)))
        assert code == grpc.StatusCode.UNAVAILABLE  # through the door; no worker behind it


def test_the_http_api_wants_the_same_keys_and_answers_401_in_openais_shape(keyed,
                                                                          redis_server):
    base = f"http://{keyed.http_address}"
    for key in (None, "sk-wrong"):
        status_, body = http_get(f"{base}/v1/models", key)
        assert status_ == 401
        assert body["error"]["code"] == "invalid_api_key"
        assert body["error"]["message"] == "missing or invalid API key"
        assert http_get(f"{base}/metrics", key)[0] == 401
    assert http_get(f"{base}/v1/models", KEY)[0] == 200
    assert http_get(f"{base}/metrics", OTHER_KEY)[0] == 200
    assert http_get(f"{base}/health")[0] in (200, 503)  # open: no worker is listed
    public = router(redis_server, ApiSecurity.from_keys([KEY], public_metrics=True))
    try:
        assert http_get(f"http://{public.http_address}/metrics")[0] == 200
        assert http_get(f"http://{public.http_address}/v1/models")[0] == 401
    finally:
        public.close()


def test_malformed_authorization_is_refused_too(keyed):
    channel = grpc.insecure_channel(keyed.address)
    call = channel.unary_unary(STATUS, pb.GetClusterStatusRequest.SerializeToString,
                               pb.ClusterStatus.FromString)
    for metadata in ([("authorization", KEY)], [("authorization", f"Basic {KEY}")],
                     [("authorization", f"Bearer {KEY}"), ("authorization", "Bearer x")]):
        with pytest.raises(grpc.RpcError) as e:
            call(pb.GetClusterStatusRequest(), metadata=metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert call(pb.GetClusterStatusRequest(), timeout=10,
                metadata=[("authorization", f"bearer {KEY}")]) is not None
    channel.close()


def test_health_stays_open_and_reflection_follows_its_flag(keyed, redis_server):
    channel = grpc.insecure_channel(keyed.address)
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10)
    assert reply.status in (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")

    def reflect(address, metadata=None):
        stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(address))
        return list(stub.ServerReflectionInfo(iter([listing]), metadata=metadata, timeout=10))

    with pytest.raises(grpc.RpcError) as e:
        reflect(keyed.address)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reflect(keyed.address, [("authorization", f"Bearer {KEY}")])
    public = router(redis_server, ApiSecurity.from_keys([KEY], public_reflection=True))
    try:
        assert reflect(public.address)
        assert code_of(lambda: status(public.address))[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        public.close()
    channel.close()


def write_pair(folder, pem) -> tuple[str, str]:
    (folder / "client.pem").write_bytes(pem.cert)
    (folder / "client.key").write_bytes(pem.key)
    return str(folder / "client.pem"), str(folder / "client.key")


def test_mutual_tls_admits_only_clients_with_a_certificate_of_its_ca(redis_server, pki,
                                                                     tmp_path):
    security = ApiSecurity.from_keys([KEY], tls_cert_chain=pki.server.cert,
                                     tls_private_key=pki.server.key, client_ca=pki.ca.cert)
    r = router(redis_server, security)
    try:
        good = Credentials(KEY, pki.ca.cert, pki.client.cert, pki.client.key)
        assert list(status(r.address, good).workers) == []
        for bad in (Credentials(KEY, pki.ca.cert),  # no client certificate
                    Credentials(KEY, pki.ca.cert, pki.other_ca.cert, pki.other_ca.key),
                    Credentials(KEY, pki.other_ca.cert, pki.client.cert, pki.client.key),
                    Credentials(KEY)):  # plaintext
            assert code_of(lambda b=bad: status(r.address, b))[0] == grpc.StatusCode.UNAVAILABLE
        no_key = Credentials(None, pki.ca.cert, pki.client.cert, pki.client.key)
        assert code_of(lambda: status(r.address, no_key))[0] == grpc.StatusCode.UNAUTHENTICATED
        # the HTTP API: TLS with the client's certificate, and none without it
        url = f"https://{r.http_address}/v1/models"
        context = ssl.create_default_context(cadata=pki.ca.cert.decode())
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            http_get(url, KEY, context)
        context.load_cert_chain(*write_pair(tmp_path, pki.client))
        assert http_get(url, KEY, context)[0] == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to TLS
            http_get(f"http://{r.http_address}/v1/models", KEY)
    finally:
        r.close()


def test_tls_alone_and_the_status_command_with_its_flags(redis_server, pki, tmp_path, capsys):
    security = ApiSecurity.from_keys([], tls_cert_chain=pki.server.cert,
                                     tls_private_key=pki.server.key)
    r = router(redis_server, security)
    try:
        (tmp_path / "ca.pem").write_bytes(pki.ca.cert)
        args = argparse.Namespace(target=r.address, timeout=10.0, stale_after=5.0,
                                  api_key=None, tls_ca=str(tmp_path / "ca.pem"),
                                  tls_cert=None, tls_key=None)
        assert cmd_status(args) == 0
        assert f"router {r.router.config.router_id}" in capsys.readouterr().out
        args.tls_ca = None  # plaintext against a TLS server
        assert cmd_status(args) == 1
        args.tls_cert = str(tmp_path / "ca.pem")  # a certificate without its key
        assert cmd_status(args) == 2
    finally:
        r.close()


def test_no_secret_in_reprs_or_logs(redis_server, pki, caplog):
    caplog.set_level(logging.DEBUG)
    security = ApiSecurity.from_keys([KEY], tls_cert_chain=pki.server.cert,
                                     tls_private_key=pki.server.key, client_ca=pki.ca.cert)
    config = RouterConfig(security=security)
    r = router(redis_server, security)
    try:
        code_of(lambda: status(r.address, Credentials("sk-wrong", pki.ca.cert, pki.client.cert,
                                                      pki.client.key)))
    finally:
        r.close()
    key_pem = pki.server.key.decode().splitlines()[1]
    seen = repr(config) + repr(security) + repr(Credentials(KEY, b"", b"", pki.client.key))
    seen += "\n".join(record.getMessage() for record in caplog.records)
    assert KEY not in seen and key_pem not in seen and "sk-wrong" not in seen


def test_security_rejects_half_configurations():
    with pytest.raises(ValueError, match="both a certificate and its private key"):
        ApiSecurity(tls_cert_chain=b"x")
    with pytest.raises(ValueError, match="needs the server's TLS certificate"):
        ApiSecurity(client_ca=b"x")
    with pytest.raises(ValueError, match="must not be empty"):
        ApiSecurity.from_keys(["ok", " "])
    assert read_keys("# ops\nk1\n\n  k2  \n") == ["k1", "k2"]


def test_a_non_loopback_host_needs_keys_and_tls_or_insecure():
    keys_only = ApiSecurity.from_keys([KEY])
    both = ApiSecurity.from_keys([KEY], tls_cert_chain=b"c", tls_private_key=b"k")
    assert exposure_refusal("127.0.0.1", ApiSecurity(), False) is None
    assert exposure_refusal("localhost", ApiSecurity(), False) is None
    assert exposure_refusal("0.0.0.0", ApiSecurity(), True) is None
    assert exposure_refusal("0.0.0.0", both, False) is None
    why = exposure_refusal("0.0.0.0", keys_only, False)
    assert "TLS (--tls-cert, --tls-key)" in why and "API keys" not in why
    assert "API keys" in exposure_refusal("10.1.2.3", ApiSecurity(), False)
    assert is_loopback("::1") and not is_loopback("0.0.0.0") and not is_loopback("")


def test_serve_on_all_interfaces_without_credentials_refuses_to_start():
    out = subprocess.run([sys.executable, "-m", "pdserve", "serve", "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert "refusing to start" in out.stderr and "--insecure" in out.stderr
