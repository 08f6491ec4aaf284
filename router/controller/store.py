"""What the cluster's controller keeps in Redis, beside the registry (router.registry).

Keys (all under `pdserve:`):
- `pdserve:controller:lease`     string "<candidate id>:<epoch>" with a TTL (PX): who
                                 controls the cluster (router.controller.election);
- `pdserve:controller:epoch`     integer: the last epoch granted; each new holder gets the
                                 next one, its fencing token;
- `pdserve:role_target:<worker>` hash {role, epoch, reason, time}: the role the controller
                                 wants the worker in. Its heartbeat reads it and switches
                                 (deploy.heartbeat); a target of an older epoch than one it
                                 has seen is ignored;
- `pdserve:role_switches`        list, newest first, at most `history` entries: JSON
                                 {time, worker, from, to, reason, epoch} per switch ordered;
- `pdserve:role_switches_total`  hash "<from>><to>" -> switches ordered (the metrics);
- `pdserve:routers`, `pdserve:router:<id>`  sorted set of router ids by time, and a hash of
                                 each router's signals with a TTL (RouterSignals fields).

Every controller write goes through `FENCED_SWITCH`, a script that checks, inside Redis,
that the lease still holds the writer's value: a holder whose lease expired (a paused
process, a partition) cannot write, whatever its own clock says.

The heartbeat reads with the synchronous client (`read_target`); the controller reads and
writes with the asyncio one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from pdserve.protocol import WorkerRole
from pdserve.router.controller.decide import RouterSignals
from pdserve.router.registry import PREFIX

LEASE = PREFIX + "controller:lease"
EPOCH = PREFIX + "controller:epoch"
SWITCHES = PREFIX + "role_switches"
SWITCH_TOTALS = PREFIX + "role_switches_total"
ROUTERS = PREFIX + "routers"


def target_key(worker_id: str) -> str:
    return f"{PREFIX}role_target:{worker_id}"


def router_key(router_id: str) -> str:
    return f"{PREFIX}router:{router_id}"


@dataclass(frozen=True)
class Target:
    role: WorkerRole
    epoch: int
    reason: str = ""
    time: float = 0.0

    @classmethod
    def from_fields(cls, raw: dict) -> Target | None:
        text = {_s(k): _s(v) for k, v in raw.items()}
        try:
            return cls(WorkerRole(text["role"]), int(text["epoch"]), text.get("reason", ""),
                       float(text.get("time", 0.0)))
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class SwitchEntry:
    """One switch the controller ordered."""

    time: float
    worker: str
    from_role: str
    to_role: str
    reason: str
    epoch: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw) -> SwitchEntry | None:
        try:
            return cls(**json.loads(_s(raw)))
        except (TypeError, ValueError):
            return None


# KEYS: lease, target, switches, totals. ARGV: lease value, role, epoch, reason, time,
# entry, history, totals field. 1: written; 0: the lease is not the writer's (fenced).
FENCED_SWITCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local seen = redis.call('HGET', KEYS[2], 'epoch')
if seen and tonumber(seen) > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[2], 'role', ARGV[2], 'epoch', ARGV[3], 'reason', ARGV[4],
           'time', ARGV[5])
redis.call('LPUSH', KEYS[3], ARGV[6])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[7]) - 1)
redis.call('HINCRBY', KEYS[4], ARGV[8], 1)
return 1
"""


def totals_field(from_role: str, to_role: str) -> str:
    return f"{from_role}>{to_role}"


def read_target(client, worker_id: str) -> Target | None:
    """(Synchronous client.) The role the controller wants `worker_id` in, if any."""
    raw = client.hgetall(target_key(worker_id))
    return Target.from_fields(raw) if raw else None


async def read_targets(client, worker_ids) -> dict[str, Target]:
    ids = list(worker_ids)
    if not ids:
        return {}
    pipe = client.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(target_key(worker_id))
    out = {}
    for worker_id, raw in zip(ids, await pipe.execute(), strict=True):
        if raw and (target := Target.from_fields(raw)) is not None:
            out[worker_id] = target
    return out


async def read_switches(client, n: int = 20) -> list[SwitchEntry]:
    """The latest `n` switches, newest first."""
    raw = await client.lrange(SWITCHES, 0, n - 1)
    return [e for e in (SwitchEntry.from_json(r) for r in raw) if e is not None]


async def read_switch_totals(client) -> dict[tuple[str, str], int]:
    raw = await client.hgetall(SWITCH_TOTALS)
    out = {}
    for k, v in raw.items():
        from_role, _, to_role = _s(k).partition(">")
        out[(from_role, to_role)] = int(v)
    return out


async def publish_signals(client, router_id: str, signals: RouterSignals, now: float,
                          ttl_s: float) -> None:
    pipe = client.pipeline()
    pipe.hset(router_key(router_id), mapping={k: str(v) for k, v in asdict(signals).items()})
    pipe.pexpire(router_key(router_id), int(ttl_s * 1000))
    pipe.zadd(ROUTERS, {router_id: now})
    await pipe.execute()


async def read_signals(client) -> RouterSignals:
    """Every live router's signals, summed (a router whose hash expired is dropped)."""
    ids = [_s(i) for i in await client.zrange(ROUTERS, 0, -1)]
    if not ids:
        return RouterSignals()
    pipe = client.pipeline(transaction=False)
    for router_id in ids:
        pipe.hgetall(router_key(router_id))
    sums = dict.fromkeys((f.name for f in fields(RouterSignals)), 0)
    dead = []
    for router_id, raw in zip(ids, await pipe.execute(), strict=True):
        if not raw:
            dead.append(router_id)
            continue
        for k, v in raw.items():
            if _s(k) in sums:
                sums[_s(k)] += int(_s(v))
    if dead:
        await client.zrem(ROUTERS, *dead)
    return RouterSignals(**sums)


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
