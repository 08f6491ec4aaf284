"""The cluster's CURVE keys: what authenticates and encrypts the data plane (the KV
transfer control plane and the token stream) between the nodes of one cluster.

Two keypairs, made once per cluster when it starts (deploy) and handed to every worker and
router in its configuration, never through the registry:
- the *server* keypair, shared by every socket that binds (each decode worker's KV
  receiver, each router's token stream): a peer proves it talks to this cluster by knowing
  the server's public key;
- the *client* keypair, shared by every socket that connects (prefill workers' KV senders,
  workers' streams to routers): servers authorise exactly this public key (ZAP), so only a
  peer holding the client secret key completes a handshake.

Keys are z85 text (40 bytes), as libzmq takes them. The secret halves never appear in
`repr`/`str`; the public halves show as short fingerprints, enough to tell two clusters
apart in a log.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("server_public", "server_secret", "client_public", "client_secret"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 40:
                raise ValueError(f"{name} must be a 40-byte z85 CURVE key")

    def __repr__(self) -> str:
        return (f"CurveKeys(server={self.server_public[:8].decode(errors='replace')}..., "
                f"client={self.client_public[:8].decode(errors='replace')}...)")

    __str__ = __repr__
