"""`--redis-url` with credentials and TLS (`rediss://`): the registry's writers and readers
reach a password-protected Redis through TLS, with the CA named in the URL, and a client
that does not speak TLS, or does not trust the server, is refused. The embedded server is
built without TLS, so a TLS terminator in this process fronts it, as stunnel or a managed
Redis's proxy would."""

from __future__ import annotations

import asyncio
import selectors
import socket
import ssl
import threading
import time

import pytest
import redis

from pdserve.bench.certs import make_pki
from pdserve.deploy.redis_server import RedisServer
from pdserve.protocol.record import WorkerRecord
from pdserve.protocol.roles import WorkerRole
from pdserve.router.registry import async_client, live_workers, publish, sync_client


class TlsTerminator:
    """Accepts TLS on a loopback port and forwards the plaintext to `port`."""

    def __init__(self, port: int, cert_file: str, key_file: str):
        self._target = port
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(cert_file, key_file)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            tls = self._ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self._target))
        sel = selectors.DefaultSelector()
        sel.register(tls, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, tls)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (ssl.SSLError, OSError):
            pass
        finally:
            sel.close()
            tls.close()
            upstream.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    pki = make_pki()
    d = tmp_path_factory.mktemp("redis-tls")
    for name, data in (("ca.pem", pki.ca.cert), ("server.pem", pki.server.cert),
                       ("server.key", pki.server.key), ("other.pem", pki.other_ca.cert)):
        (d / name).write_bytes(data)
    server = RedisServer()
    proxy = TlsTerminator(server.port, str(d / "server.pem"), str(d / "server.key"))
    yield server, proxy, d
    proxy.close()
    server.stop()


def _url(server, proxy, scheme, ca) -> str:
    return f"{scheme}://:{server.password}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={ca}"


def test_the_registry_works_over_rediss_with_a_password(tls_redis):
    server, proxy, d = tls_redis
    url = _url(server, proxy, "rediss", d / "ca.pem")
    record = WorkerRecord("d0", WorkerRole.DECODE, "node-a", "tcp://127.0.0.1:1", 16, 20, 10,
                          1, 0, 0, time.time(), 1.0)
    writer = sync_client(url)
    try:
        publish(writer, record, ttl_s=30)
    finally:
        writer.close()

    async def read():
        reader = async_client(url)
        try:
            return await live_workers(reader)
        finally:
            await reader.aclose()

    assert [r.worker_id for r in asyncio.run(read())] == ["d0"]


def test_a_client_without_tls_or_trust_is_refused(tls_redis):
    server, proxy, d = tls_redis
    plain = sync_client(f"redis://:{server.password}@127.0.0.1:{proxy.port}/0")
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    untrusting = sync_client(_url(server, proxy, "rediss", d / "other.pem"))
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        untrusting.ping()
    no_password = sync_client(f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={d / 'ca.pem'}")
    with pytest.raises(redis.AuthenticationError):
        no_password.ping()
