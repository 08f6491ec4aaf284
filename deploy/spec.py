"""What a cluster is made of, as `pdserve serve` flags or a test describe it, and the one
function that turns it into each worker's configuration (engine included).

The data plane's CURVE keys (protocol.keys) are made here, once per cluster, when the
cluster starts (`secured`), and travel inside the spec and the worker configurations it
makes: to worker processes through their spawn arguments, to Ray actors as their
constructor arguments (Ray's own authenticated channel), to routers in their
RouterConfig. They never go to the registry, and no repr shows the secret halves.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import zmq

from pdserve.deploy.handles import DEFAULT_CALL_TIMEOUT_S
from pdserve.engine import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.config import default_device
from pdserve.kvtransfer.transports import TransportKind
from pdserve.models import DEFAULT_MODEL, resolve_model
from pdserve.protocol import CurveKeys, WorkerRole
from pdserve.router.router import RouterConfig
from pdserve.router.security import ApiSecurity
from pdserve.worker import ENGINE_MODES, WorkerConfig

# A CPU step costs its tokens plus ~56 ms (the cost profile's fit): at 256 tokens that is
# ~5% of the step here, so shorter prompts still share a step and longer ones run alone.
CPU_PREFILL_PACK_TOKENS = 256


class CurveMode(enum.Enum):
    """Whether the data plane (KV transfer, token stream) is authenticated and encrypted."""

    AUTO = "auto"  # on whenever something of it binds beyond loopback
    ON = "on"
    OFF = "off"


def make_curve_keys() -> CurveKeys:
    """A fresh server and client keypair for one cluster."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return CurveKeys(server_public, server_secret, client_public, client_secret)


def is_loopback(host: str) -> bool:
    """Whether a bind address stays on this machine ("localhost" or a loopback IP)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a wildcard or a name: assume it is reachable from elsewhere
        return False


@dataclass(frozen=True)
class ClusterSpec:
    model: str = DEFAULT_MODEL  # a built-in name or a local HF folder
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    # workers whose role the cluster's controller sets (router.controller); they start as
    # `adaptive_roles()` says
    adaptive: int = 0
    block_size: int = 16
    num_blocks: int = 512
    enable_prefix_caching: bool = True  # off: every prompt computed and sent whole
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    # a prefill worker's steps take more prompts only up to this many tokens (engine
    # SchedulerConfig); None: CPU_PREFILL_PACK_TOKENS on a CPU, the whole budget on a GPU
    prefill_pack_tokens: int | None = None
    transport: TransportKind = TransportKind.ZMQ
    device: str | None = None  # None: CUDA where the worker runs has it, else CPU
    threads_per_worker: int = 1
    gpus_per_worker: float = 0.0  # Ray only: GPUs each worker actor asks for
    pin_cores: bool = False  # one core per worker, round robin over this process's cores
    handshake_timeout_s: float = 5.0
    ack_timeout_s: float = 10.0
    keepalive_s: float = 1.0  # a prefill job renews its decode lease this often
    heartbeat_s: float = 0.5
    heartbeat_ttl_s: float = 3.0  # a worker silent this long leaves the routers' views
    # a router call to a worker (reserve, submit, generate, abort) that gets no answer in
    # this time finds the worker gone (deploy.handles, Timeouts)
    worker_call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    # a worker ends the jobs of a router whose token stream has been unreachable this long
    # (worker.publisher)
    router_stream_grace_s: float = 5.0
    drain_timeout_s: float = 60.0  # a role switch ends the jobs still live after this long
    router: RouterConfig = field(default_factory=RouterConfig)
    curve: CurveMode = CurveMode.AUTO
    curve_keys: CurveKeys | None = field(default=None, repr=False)  # made by `secured`

    def __post_init__(self) -> None:
        if self.curve is CurveMode.OFF and self.curve_keys is not None:
            raise ValueError("curve is off but CURVE keys were given")
        if min(self.prefill, self.decode, self.colocated, self.adaptive) < 0:
            raise ValueError("worker counts must be >= 0")
        if self.prefill_pack_tokens is not None and self.prefill_pack_tokens < 1:
            raise ValueError(f"prefill_pack_tokens must be >= 1, got {self.prefill_pack_tokens}")
        if self.decode + self.colocated + self.adaptive == 0:
            raise ValueError("at least one decode or colocated worker is needed")
        for name, value in (("worker_call_timeout_s", self.worker_call_timeout_s),
                            ("router_stream_grace_s", self.router_stream_grace_s),
                            ("heartbeat_ttl_s", self.heartbeat_ttl_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    def for_workers(self) -> ClusterSpec:
        """This spec without what only the router needs to keep secret (its API keys and
        TLS key): what is handed to worker processes and actors."""
        return replace(self, router=replace(self.router, security=ApiSecurity()))

    def secured(self, hosts: Iterable[str]) -> ClusterSpec:
        """This spec with the cluster's CURVE keys, made now, where its data plane needs
        them: `curve` ON, or AUTO and one of `hosts` (where KV receivers and token streams
        bind) beyond loopback. Keys already given are kept. Called once, as the cluster
        starts; every worker and router it starts gets the same keys."""
        wanted = self.curve is CurveMode.ON or (
            self.curve is CurveMode.AUTO and not all(is_loopback(h) for h in hosts))
        if not wanted or self.curve_keys is not None:
            return self
        return replace(self, curve_keys=make_curve_keys())

    def roles(self) -> list[tuple[str, WorkerRole]]:
        """(worker id, role) of every worker, prefill first, the adaptive ones last with
        the role they start in."""
        return ([(f"prefill-{i}", WorkerRole.PREFILL) for i in range(self.prefill)]
                + [(f"decode-{i}", WorkerRole.DECODE) for i in range(self.decode)]
                + [(f"colocated-{i}", WorkerRole.COLOCATED) for i in range(self.colocated)]
                + self.adaptive_roles())

    def adaptive_roles(self) -> list[tuple[str, WorkerRole]]:
        """(worker id, first role) of the adaptive workers: one alone is colocated (it
        must serve whole requests); more start half prefill (rounded down), half decode."""
        if self.adaptive == 1:
            return [("adaptive-0", WorkerRole.COLOCATED)]
        prefill = self.adaptive // 2
        return [(f"adaptive-{i}", WorkerRole.PREFILL if i < prefill else WorkerRole.DECODE)
                for i in range(self.adaptive)]

    def is_adaptive(self, worker_id: str) -> bool:
        return any(worker_id == w for w, _ in self.adaptive_roles())

    def pack_tokens(self, device: str) -> int | None:
        """The prefill step's packing limit for a worker on `device`."""
        if self.prefill_pack_tokens is not None:
            return self.prefill_pack_tokens
        return None if device.startswith("cuda") else CPU_PREFILL_PACK_TOKENS

    def worker_config(self, worker_id: str, role: WorkerRole,
                      kv_host: str = "127.0.0.1") -> WorkerConfig:
        """The configuration of one worker. Call it where the worker runs: it resolves (and
        on first use converts) the model there, and picks that machine's device."""
        device = self.device or default_device()
        engine = EngineConfig(
            model=ModelConfig.from_pretrained(resolve_model(self.model)),
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_blocks,
                              enable_prefix_caching=self.enable_prefix_caching),
            scheduler=SchedulerConfig(mode=ENGINE_MODES[role],
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_num_seqs=self.max_num_seqs,
                                      prefill_pack_tokens=self.pack_tokens(device)),
            device=device)
        # a held KV waits for the router's re-send as long as a reservation waits for KV
        return WorkerConfig(role, engine, worker_id, self.transport, kv_host,
                            handshake_timeout_s=self.handshake_timeout_s,
                            ack_timeout_s=self.ack_timeout_s, keepalive_s=self.keepalive_s,
                            hold_s=self.router.lease_s,
                            stream_grace_s=self.router_stream_grace_s,
                            curve=self.curve_keys, adaptive=self.is_adaptive(worker_id),
                            drain_timeout_s=self.drain_timeout_s)
