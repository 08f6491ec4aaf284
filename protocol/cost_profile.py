"""A cost profile: what one worker's engine step, a KV transfer and the router's path cost,
for one model on one machine. `pdserve profile` measures one on this machine (fitted to the
real engine); `bench.costmodel.hardware` derives one for a public GPU from its datasheet
(a roofline). The simulator (`bench.sim`) reads nothing else of the hardware, and a router
given one (`pdserve serve --cost-profile`) predicts each request's TTFT and TPOT with it
(router.predict).

The step model. One engine step computes `tokens` new tokens: the chunks of the prompts it
prefills plus one per decoding sequence. It costs

    step_s = base_s + max(floor_s, token_s * tokens) + pair_s * pairs + context_s * context
             + seq_s * seqs

- `floor_s`: reading the weights once (the memory-bound floor every step pays), and
  `token_s` the per-token cost of the linear layers once they are compute-bound; the step is
  the larger of the two (a roofline in the token count).
- `pairs`: prefill attention, the (query, key) pairs of the causal chunks: a chunk of n
  tokens after o already computed ones attends n * o + n * (n + 1) / 2 pairs (`chunk_pairs`).
- `context`: decode attention, the context tokens (KV entries) the decoding sequences read,
  summed over the sequences of the step.
- `seqs`: the decoding sequences of the step; `seq_s` what each costs beyond its token and
  its context (its own attention call, sampling row and bookkeeping).
- `base_s`: what a step costs beyond those (scheduling, sampling, launch overheads).

Neighbours: `contention_decode` / `contention_prefill`, how much slower a step (without / with
a prompt chunk) runs while another worker computes on the same host (shared memory bus and
caches: bench.costmodel.contention); 0 for a GPU, which a worker has to itself.

Serving: `serve_seq_s`, what each decoding sequence adds to a step in the serving path
beyond the engine's step (the worker's loop, the token stream, and on a host shared with the
router and clients, their CPU), measured against a real decode batch (router_path).

KV transfer: `latency_s + bytes / bytes_per_s` per transfer (the prefill's KV, all layers).
The router's path: `router_s` per request from arrival to the order reaching a worker, and
`stream_s` from a token's step end to the client.

Files are JSON with `version` (`VERSION`): a reader refuses another version rather than
misread it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

VERSION = 1


def chunk_pairs(offset: int, n: int) -> int:
    """Causal attention pairs of a prefill chunk of `n` tokens after `offset` computed ones."""
    return n * offset + n * (n + 1) // 2


@dataclass(frozen=True)
class StepModel:
    base_s: float
    floor_s: float
    token_s: float
    pair_s: float
    context_s: float
    seq_s: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value >= 0:
                raise ValueError(f"step model: {name} must be >= 0, got {value}")

    def step_s(self, tokens: int, pairs: int = 0, context: int = 0, seqs: int = 0) -> float:
        """Seconds of one step (see the module)."""
        return (self.base_s + max(self.floor_s, self.token_s * tokens)
                + self.pair_s * pairs + self.context_s * context + self.seq_s * seqs)

    @property
    def knee_tokens(self) -> float:
        """Tokens per step where the linear layers turn compute-bound."""
        return self.floor_s / self.token_s if self.token_s > 0 else float("inf")


@dataclass(frozen=True)
class TransferModel:
    latency_s: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.bytes_per_s <= 0:
            raise ValueError("transfer model: latency_s must be >= 0 and bytes_per_s > 0")

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class CostProfile:
    """One worker's costs for one model on one machine (or one GPU)."""

    source: str  # "measured" (pdserve profile) or "roofline" (a datasheet)
    machine: dict  # what it ran on: cpu / gpu name, cores, threads, ...
    model: dict  # name, layers, hidden size, kv heads, head dim, parameters, dtype
    kv_bytes_per_token: int
    kv_capacity_tokens: int  # KV a worker holds (its blocks x block size)
    step: StepModel
    transfer: TransferModel
    router_s: float = 0.0
    stream_s: float = 0.0
    contention_decode: float = 0.0
    contention_prefill: float = 0.0
    serve_seq_s: float = 0.0
    # where each number came from (a datasheet's URL, the command that measured it) and
    # how well the fit held (residuals)
    sources: dict = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise ValueError(f"cost profile version {self.version}, this pdserve reads "
                             f"version {VERSION}")
        if self.kv_bytes_per_token <= 0 or self.kv_capacity_tokens <= 0:
            raise ValueError("kv_bytes_per_token and kv_capacity_tokens must be > 0")
        if min(self.router_s, self.stream_s, self.contention_decode,
               self.contention_prefill, self.serve_seq_s) < 0:
            raise ValueError("router_s, stream_s and the contentions must be >= 0")

    @property
    def num_layers(self) -> int:
        """The model's layers (`model["layers"]`): the KV streams layer by layer."""
        return max(1, int(self.model.get("layers", 1)))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CostProfile:
        data = dict(data)
        if data.get("version") != VERSION:
            raise ValueError(f"cost profile version {data.get('version')!r}, this pdserve "
                             f"reads version {VERSION}")
        data["step"] = StepModel(**data["step"])
        data["transfer"] = TransferModel(**data["transfer"])
        return cls(**data)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> CostProfile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read cost profile {path}: {e}") from e
        return cls.from_json(data)
