"""Who may call the router's public APIs: API keys, TLS and mutual TLS.

Keys. A client sends `authorization: Bearer <key>` (gRPC metadata, or the HTTP header as
OpenAI clients send it). The router keeps only the SHA-256 digest of each key it accepts
and compares the presented key's digest with every one of them in constant time, so
neither the answer nor its timing says which keys exist; a missing or wrong key gets
UNAUTHENTICATED (HTTP 401) with no more detail. Health is always open (orchestrators probe
it without credentials); reflection and the HTTP server's /metrics are open only with
`public_reflection` and `public_metrics`.

TLS. `tls` holds the server's certificate chain and key (PEM), and `client_ca` the CA
whose certificates clients must present (mutual TLS): a client without one is refused in
the handshake. The secrets never appear in a repr.

Contract: `ApiSecurity` is frozen and picklable; `check(metadata)` is pure and cheap.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

AUTH_HEADER = "authorization"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection",
                       "grpc.reflection.v1.ServerReflection")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiSecurity:
    key_digests: tuple[bytes, ...] = field(default=(), repr=False)  # empty: no key needed
    tls_cert_chain: bytes = field(default=b"", repr=False)  # PEM; empty: plaintext
    tls_private_key: bytes = field(default=b"", repr=False)
    client_ca: bytes = field(default=b"", repr=False)  # PEM; set: mutual TLS
    public_reflection: bool = False
    public_metrics: bool = False  # the HTTP server's /metrics answers without a key

    def __post_init__(self) -> None:
        if bool(self.tls_cert_chain) != bool(self.tls_private_key):
            raise ValueError("TLS needs both a certificate and its private key")
        if self.client_ca and not self.tls_cert_chain:
            raise ValueError("mutual TLS (a client CA) needs the server's TLS certificate")

    @classmethod
    def from_keys(cls, keys: Iterable[str], **kwargs) -> ApiSecurity:
        """Raises ValueError for an empty key."""
        keys = list(keys)
        if any(not k.strip() for k in keys):
            raise ValueError("an API key must not be empty")
        return cls(tuple(digest(k.strip()) for k in keys), **kwargs)

    @property
    def needs_key(self) -> bool:
        return bool(self.key_digests)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_chain)

    def accepts(self, presented: str | None) -> bool:
        """Whether `presented` (the Authorization value) carries an accepted key."""
        if not self.needs_key:
            return True
        scheme, _, key = (presented or "").partition(" ")
        want = digest(key.strip()) if scheme.lower() == "bearer" else b""
        ok = False
        for known in self.key_digests:  # all of them, whatever matched: constant time
            ok |= hmac.compare_digest(known, want)
        return ok

    def open_service(self, service: str) -> bool:
        """Whether `service` (a gRPC service's full name) answers without a key."""
        return service == HEALTH_SERVICE or (self.public_reflection
                                             and service in REFLECTION_SERVICES)

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
        """Whether a call of `method` ("/package.Service/Method") with `metadata` may go on."""
        if self.open_service(method.lstrip("/").split("/", 1)[0]):
            return True
        values = [v for k, v in metadata if k.lower() == AUTH_HEADER]
        value = values[0] if len(values) == 1 else None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return self.accepts(value)


def read_keys(text: str) -> list[str]:
    """Keys from a keys file: one per line; blank lines and `#` comments are skipped."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
