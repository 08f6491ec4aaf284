"""`pdserve serve` flags for who may call the router's gRPC and HTTP APIs (router.security),
and the rule that a server listening beyond loopback needs API keys and TLS unless told
`--insecure`."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket

from pdserve.router.security import ApiSecurity, read_keys
from pdserve.rpc.credentials import API_KEY_ENV


def add_security_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "security", "API keys and TLS for the client APIs. Listening on a non-loopback "
                    "address (--host) needs both, or --insecure.")
    g.add_argument("--api-key", default=None,
                   help="clients must send 'authorization: Bearer KEY' (default: "
                        f"${API_KEY_ENV}); health stays open")
    g.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="accepted keys, one per line ('#' comments), besides --api-key")
    g.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve TLS with this certificate chain")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="its private key")
    g.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="mutual TLS: clients must present a certificate this CA signed")
    g.add_argument("--public-reflection", action="store_true",
                   help="gRPC reflection answers without an API key")
    g.add_argument("--public-metrics", action="store_true",
                   help="the HTTP server's /metrics answers without an API key (for a "
                        "Prometheus that sends none)")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without API keys or TLS")


def api_security(args: argparse.Namespace) -> ApiSecurity:
    """Raises OSError for a file that cannot be read, ValueError for a bad combination."""
    def read(path: str | None) -> bytes:
        if path is None:
            return b""
        with open(path, "rb") as f:
            return f.read()

    keys = [k for k in (args.api_key or os.environ.get(API_KEY_ENV),) if k]
    if args.api_key_file:
        keys += read_keys(read(args.api_key_file).decode())
    return ApiSecurity.from_keys(keys, tls_cert_chain=read(args.tls_cert),
                                 tls_private_key=read(args.tls_key),
                                 client_ca=read(args.tls_client_ca),
                                 public_reflection=args.public_reflection,
                                 public_metrics=args.public_metrics)


def exposure_refusal(host: str, security: ApiSecurity, insecure: bool) -> str | None:
    """Why the server must not start on `host`, or None."""
    if insecure or is_loopback(host):
        return None
    missing = [what for what, ok in (("API keys (--api-key, --api-key-file)",
                                      security.needs_key),
                                     ("TLS (--tls-cert, --tls-key)", security.tls)) if not ok]
    if not missing:
        return None
    return (f"--host {host} listens beyond this machine, and without {' and '.join(missing)} "
            "anyone who reaches the port can use the server, read its traffic or both; give "
            "them, or --insecure to run so anyway")


def is_loopback(host: str) -> bool:
    """"" (every interface) is not; a name is when all it resolves to is."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: what it resolves to
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
