"""Certificates made for a run (the TLS tests, bench.client_tls): a CA, a server
certificate for 127.0.0.1 and localhost, a client certificate it signed, and a CA it did
not; all PEM bytes, made with the `cryptography` package (a dev dependency)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    other_ca: Pem  # signs nothing the server trusts


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False,
          san: list | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(name: str) -> tuple[Pem, x509.Name, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = _cert(name, key, subject, key, ca=True)
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)), subject, key


def make_pki() -> Pki:
    ca, ca_name, ca_key = _ca("pdserve test CA")
    server_key, client_key = _key(), _key()
    server = _cert("pdserve router", server_key, ca_name, ca_key,
                   san=[x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("pdserve client", client_key, ca_name, ca_key)
    other, _, _ = _ca("someone else's CA")
    pem = serialization.Encoding.PEM
    return Pki(ca, Pem(server.public_bytes(pem), _pem_key(server_key)),
                   Pem(client.public_bytes(pem), _pem_key(client_key)), other)
