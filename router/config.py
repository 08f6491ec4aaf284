"""The router's frozen configuration (`pdserve serve` flags map onto it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.protocol import CostProfile, CurveKeys
from pdserve.router.controller.decide import ControllerConfig
from pdserve.router.limits import InputLimits
from pdserve.router.policy import Policy
from pdserve.router.security import ApiSecurity


@dataclass(frozen=True)
class RouterConfig:
    router_id: str = "router-0"
    stream_host: str = "127.0.0.1"  # the token-stream endpoint binds here; must be routable
    disaggregation_threshold: int = 128  # prompt tokens; `auto` prefills shorter ones locally
    max_in_flight_per_worker: int = 32
    max_queue: int = 256  # requests waiting for a worker slot
    # a decode reservation ends after this long with no sign of the prefill side (no KV,
    # no keep-alive; the prefill queue does not count: protocol.orders, Leases)
    lease_s: float = 10.0
    refresh_s: float = 0.5  # registry poll period
    policy: Policy = Policy.LOAD
    # admission bound on the time to first token for a request with no TTFT SLO of its own
    # (router.admission); 0 admits whatever the queued work
    default_ttft_slo_s: float = 30.0
    # what one request may make the router read and tokenize (router.limits)
    input_limits: InputLimits = InputLimits()
    max_attempts: int = 3  # dispatches of a request that a worker fails before any token
    migration_limit: int = 3  # moves to another worker after tokens streamed (Dynamo's)
    security: ApiSecurity = ApiSecurity()  # API keys and TLS of the public APIs
    otlp_endpoint: str = ""  # OTLP/gRPC collector for request traces; "" exports none
    # the cluster's CURVE keys: the token stream then admits only the cluster's workers
    # (router.stream); None leaves it open (loopback only)
    curve: CurveKeys | None = field(default=None, repr=False)
    # what a step, a KV transfer and the router's path cost (`pdserve profile`): with one,
    # each request is placed and admitted by predicted TTFT and TPOT (router.placement);
    # None: by `disaggregation_threshold` and the queue-token bound (router.admission)
    cost_profile: CostProfile | None = field(default=None, repr=False)
    # the cluster's controller, which this router may be elected to run (router.controller);
    # None: the cluster has no adaptive worker
    controller: ControllerConfig | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
