"""Which router's controller acts: one per cluster, elected through a lease in Redis
(router.controller.store, keys).

Life of a candidate:
1. FOLLOWER  `campaign()` tries to take the lease: `SET lease "<id>:<epoch>" NX PX ttl`,
             the epoch one more than the last granted (a script, so that only a taker
             spends an epoch). Taken: LEADER with that epoch, its fencing token.
2. LEADER    `campaign()` renews the lease (PEXPIRE, only while it still holds this
             candidate's value). `leads` is True until `ttl - margin` after the last
             renewal that landed, by this process's monotonic clock: a holder that cannot
             renew stops acting before its lease can expire in Redis. Every write it makes
             is fenced in Redis besides (store.FENCED_SWITCH), so even a holder that
             paused past its lease writes nothing.
   LOST      a renewal finds the lease gone or another's: FOLLOWER again (it campaigns
             like the others). When a holder dies, its lease expires after `ttl` and the
             first follower to campaign then takes over, with the next epoch.
3. RESIGNED  `resign()` deletes the lease if it is still this candidate's, so another takes
             over at once (an orderly shutdown).
Errors: a Redis that does not answer makes `campaign()` return False (and lose the lead
once its margin passes); it never raises for it.
"""

from __future__ import annotations

import logging
import time

from pdserve.router.controller.store import EPOCH, LEASE
from pdserve.router.registry import RegistryErrors

log = logging.getLogger(__name__)

# KEYS: lease, epoch. ARGV: candidate id, ttl ms. The new epoch, or nil when held.
_TAKE = """
local epoch = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
if not redis.call('SET', KEYS[1], ARGV[1] .. ':' .. epoch, 'NX', 'PX', ARGV[2]) then
  return false
end
redis.call('SET', KEYS[2], epoch)
return epoch
"""
# KEYS: lease. ARGV: value, ttl ms. 1: renewed; 0: not this value's any more.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Election:
    def __init__(self, client, candidate_id: str, ttl_s: float, margin_s: float | None = None):
        """`client`: an asyncio Redis client; `margin_s`: how long before its lease would
        expire a holder stops acting (default: a fifth of `ttl_s`)."""
        self.client = client
        self.candidate_id = candidate_id
        self.ttl_s = ttl_s
        self.margin_s = ttl_s / 5 if margin_s is None else margin_s
        self.epoch = 0  # the fencing token of the lease held, 0 when none
        self._valid_until = 0.0  # monotonic

    @property
    def lease_value(self) -> str:
        return f"{self.candidate_id}:{self.epoch}"

    @property
    def leads(self) -> bool:
        return self.epoch > 0 and time.monotonic() < self._valid_until

    async def campaign(self) -> bool:
        """Take or renew the lease; whether this candidate leads now."""
        started = time.monotonic()
        ms = int(self.ttl_s * 1000)
        try:
            if self.epoch:
                if await self.client.eval(_RENEW, 1, LEASE, self.lease_value, ms):
                    self._valid_until = started + self.ttl_s - self.margin_s
                    return True
                log.warning("controller %s lost its lease (epoch %d)", self.candidate_id,
                            self.epoch)
                self.epoch = 0
            epoch = await self.client.eval(_TAKE, 2, LEASE, EPOCH, self.candidate_id, ms)
        except RegistryErrors as e:
            log.debug("controller election: Redis does not answer: %s", e)
            return self.leads
        if epoch:
            self.epoch = int(epoch)
            self._valid_until = started + self.ttl_s - self.margin_s
            log.warning("controller %s leads the cluster (epoch %d)", self.candidate_id,
                        self.epoch)
            return True
        return False

    async def holder(self) -> tuple[str, int]:
        """(candidate id, epoch) of the lease's holder; ("", 0) when none."""
        raw = await self.client.get(LEASE)
        if not raw:
            return "", 0
        text = raw.decode() if isinstance(raw, bytes) else raw
        holder, _, epoch = text.rpartition(":")
        return holder, int(epoch) if epoch.isdigit() else 0

    async def resign(self) -> None:
        if self.epoch:
            try:
                await self.client.eval(_RESIGN, 1, LEASE, self.lease_value)
            except RegistryErrors as e:
                log.info("controller %s could not resign (its lease expires): %s",
                         self.candidate_id, e)
        self.epoch = 0
