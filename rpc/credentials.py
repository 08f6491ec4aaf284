"""How a client reaches a server that wants API keys or TLS: the channel, the call
metadata, and the command-line flags every client command shares.

`--api-key` (or `PDSERVE_API_KEY`) is sent as `authorization: Bearer <key>`; `--tls-ca`
names the PEM of the CA that signed the server's certificate (`system` for the system's
roots), and `--tls-cert` / `--tls-key` the client's certificate for mutual TLS. Files are
read here, once; nothing of them is printed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import grpc

API_KEY_ENV = "PDSERVE_API_KEY"


@dataclass(frozen=True)
class Credentials:
    api_key: str | None = field(default=None, repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)  # b"": the system's roots
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None

    def channel(self, target: str) -> grpc.aio.Channel:
        if self.tls_ca is None and self.tls_cert is None:
            return grpc.aio.insecure_channel(target)
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca or None, private_key=self.tls_key,
            certificate_chain=self.tls_cert))


def add_credential_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("credentials (for a server with API keys or TLS)")
    g.add_argument("--api-key", default=None,
                   help=f"sent as 'authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    g.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="connect with TLS, trusting this CA's certificate ('system': the "
                        "system's roots)")
    g.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="the client's certificate, for a server with mutual TLS")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="its private key")


def credentials_from_args(args: argparse.Namespace) -> Credentials:
    """Raises OSError for a file that cannot be read, ValueError for a lone cert or key.
    Flags missing from `args` (a namespace built without `add_credential_flags`) are
    taken as not given."""
    api_key, tls_ca, tls_cert, tls_key = (getattr(args, name, None) for name in
                                          ("api_key", "tls_ca", "tls_cert", "tls_key"))
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    ca = b"" if tls_ca == "system" else read(tls_ca)
    if ca is None and tls_cert:
        ca = b""  # mutual TLS implies TLS
    return Credentials(api_key or os.environ.get(API_KEY_ENV) or None, ca, read(tls_cert),
                       read(tls_key))
