"""What a cluster is made of, as `pdserve serve` flags or a test describe it, and the one
function that turns it into each worker's configuration (engine included)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pdserve.deploy.handles import DEFAULT_CALL_TIMEOUT_S
from pdserve.engine import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.config import default_device
from pdserve.kvtransfer.transports import TransportKind
from pdserve.models import DEFAULT_MODEL, resolve_model
from pdserve.protocol import WorkerRole
from pdserve.router.router import RouterConfig
from pdserve.router.security import ApiSecurity
from pdserve.worker import ENGINE_MODES, WorkerConfig


@dataclass(frozen=True)
class ClusterSpec:
    model: str = DEFAULT_MODEL  # a built-in name or a local HF folder
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    block_size: int = 16
    num_blocks: int = 512
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
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
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.colocated) < 0:
            raise ValueError("worker counts must be >= 0")
        if self.decode + self.colocated == 0:
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

    def roles(self) -> list[tuple[str, WorkerRole]]:
        """(worker id, role) of every worker, prefill first."""
        return ([(f"prefill-{i}", WorkerRole.PREFILL) for i in range(self.prefill)]
                + [(f"decode-{i}", WorkerRole.DECODE) for i in range(self.decode)]
                + [(f"colocated-{i}", WorkerRole.COLOCATED) for i in range(self.colocated)])

    def worker_config(self, worker_id: str, role: WorkerRole,
                      kv_host: str = "127.0.0.1") -> WorkerConfig:
        """The configuration of one worker. Call it where the worker runs: it resolves (and
        on first use converts) the model there, and picks that machine's device."""
        device = self.device or default_device()
        engine = EngineConfig(
            model=ModelConfig.from_pretrained(resolve_model(self.model)),
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_blocks),
            scheduler=SchedulerConfig(mode=ENGINE_MODES[role],
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_num_seqs=self.max_num_seqs),
            device=device)
        # a held KV waits for the router's re-send as long as a reservation waits for KV
        return WorkerConfig(role, engine, worker_id, self.transport, kv_host,
                            handshake_timeout_s=self.handshake_timeout_s,
                            ack_timeout_s=self.ack_timeout_s, keepalive_s=self.keepalive_s,
                            hold_s=self.router.lease_s,
                            stream_grace_s=self.router_stream_grace_s)
