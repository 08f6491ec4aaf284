"""A worker as the cluster's registry lists it: who it is, where its KV goes, its load."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace

from pdserve.protocol.roles import WorkerRole, WorkerState


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    role: WorkerRole
    node: str
    kv_endpoint: str  # "" unless the role receives KV
    block_size: int
    total_blocks: int
    free_blocks: int
    running: int
    waiting: int
    queued_prefill_tokens: int
    heartbeat: float  # Unix seconds
    started: float  # Unix seconds: a restarted worker (same id) is a new incarnation
    prefill_tokens_per_s: float = 0.0  # measured on its steps; 0.0: not measured yet
    # jobs holding KV under a lease: reservations waiting for KV (decode), KV waiting for
    # its ack or a re-send (prefill)
    leases: int = 0
    decode_step_s: float = 0.0  # a decode-only step's time, measured; 0.0: not yet
    # prompt tokens looked up in its prefix cache, and those found, since it started
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    chunk_tokens: int = 0  # tokens per engine step (its prefill chunk); 0: not reported
    state: WorkerState = WorkerState.SERVING
    adaptive: bool = False  # the cluster's controller may change its role
    role_since: float = 0.0  # Unix seconds: when it took its present role (0.0: unknown)
    # what prompt chunks add to its decoding steps, per step on average, measured
    prefill_stall_s: float = 0.0

    @property
    def serving(self) -> bool:
        """Whether routers may send it new orders of its role."""
        return self.state is WorkerState.SERVING

    def without_room(self) -> WorkerRecord:
        """This record, seen as full (until the worker's next heartbeat says otherwise)."""
        return replace(self, free_blocks=0)

    def to_fields(self) -> dict[str, str]:
        """Flat string fields (a Redis hash)."""
        values = asdict(self)
        values["role"] = self.role.value
        values["state"] = self.state.value
        values["adaptive"] = int(self.adaptive)
        return {k: str(v) for k, v in values.items()}

    @classmethod
    def from_fields(cls, raw: dict) -> WorkerRecord:
        """The inverse of `to_fields`; keys and values may be bytes. Raises ValueError for a
        record that is missing a field or holds a bad value."""
        text = {(k.decode() if isinstance(k, bytes) else k):
                (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
        values = {}
        try:
            for f in fields(cls):
                if f.name not in text and f.default is not MISSING:
                    continue  # a field newer than the worker that wrote the record
                value = text[f.name]
                values[f.name] = _PARSE.get(f.type, str)(value)
        except (KeyError, ValueError) as e:
            raise ValueError(f"bad worker record {text.get('worker_id', '?')!r}: {e!r}") from e
        return cls(**values)


_PARSE = {"WorkerRole": WorkerRole, "WorkerState": WorkerState, "int": int, "float": float,
          "bool": lambda v: bool(int(v))}
