"""A worker's frozen configuration: its role, its engine and how its KV travels."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from pdserve.engine import EngineConfig, EngineMode
from pdserve.kvtransfer.base import KVSpec
from pdserve.kvtransfer.transports import TransportKind
from pdserve.protocol import CurveKeys, WorkerRole

ENGINE_MODES = {WorkerRole.PREFILL: EngineMode.PREFILL_ONLY,
                WorkerRole.DECODE: EngineMode.DECODE_ONLY,
                WorkerRole.COLOCATED: EngineMode.MIXED}


@dataclass(frozen=True)
class WorkerConfig:
    role: WorkerRole
    engine: EngineConfig  # in the role's mode (ENGINE_MODES)
    worker_id: str
    transport: TransportKind = TransportKind.ZMQ
    kv_host: str = "127.0.0.1"  # decode: the KV receiver binds here; must be routable
    handshake_timeout_s: float = 5.0  # prefill: a decode worker that never answers is gone
    ack_timeout_s: float = 10.0  # prefill: after the first token, a receiver that never acks
    keepalive_s: float = 1.0  # prefill: how often a waiting job renews its reservation's lease
    # prefill: how long a job whose transfer failed keeps its KV for a re-send order
    # (protocol.orders, Re-sends), counted from the end of its prefill
    hold_s: float = 10.0
    # a router whose token stream is unreachable this long is gone: its jobs end (publisher)
    stream_grace_s: float = 5.0
    # the cluster's CURVE keys (protocol.keys): the KV transfer and the token stream are then
    # authenticated and encrypted; None leaves both open (loopback only)
    curve: CurveKeys | None = field(default=None, repr=False)
    # the cluster's controller may change its role at run time (worker.switch)
    adaptive: bool = False
    # a role switch ends the jobs still live this long after its drain began
    drain_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        want = ENGINE_MODES[self.role]
        if self.engine.scheduler.mode is not want:
            raise ValueError(f"a {self.role.value} worker needs an engine in {want.value} mode, "
                             f"got {self.engine.scheduler.mode.value}")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if not self.hold_s > 0:
            raise ValueError(f"hold_s must be > 0, got {self.hold_s}")
        if not self.stream_grace_s > 0:
            raise ValueError(f"stream_grace_s must be > 0, got {self.stream_grace_s}")
        if not self.drain_timeout_s > 0:
            raise ValueError(f"drain_timeout_s must be > 0, got {self.drain_timeout_s}")

    def for_role(self, role: WorkerRole) -> WorkerConfig:
        """This configuration for `role`, its engine in that role's mode."""
        scheduler = replace(self.engine.scheduler, mode=ENGINE_MODES[role])
        return replace(self, role=role, engine=replace(self.engine, scheduler=scheduler))

    @property
    def kv_spec(self) -> KVSpec:
        """What a prefill and a decode worker must agree on to exchange KV."""
        m = self.engine.model
        return KVSpec(Path(m.path).name, m.num_layers, m.num_kv_heads, m.head_dim,
                      self.engine.torch_dtype)
