"""What a worker does in the cluster, and whether it takes new work: enums from the CLI to
the registry."""

from __future__ import annotations

import enum


class WorkerRole(enum.Enum):
    PREFILL = "prefill"  # runs prompts, streams their KV to decode workers
    DECODE = "decode"  # receives KV and decodes; prefills short prompts itself
    COLOCATED = "colocated"  # prefill and decode in one engine (the baseline)

    @property
    def receives_kv(self) -> bool:
        return self is WorkerRole.DECODE

    @property
    def decodes(self) -> bool:
        """Whether it streams tokens to the router (and can prefill a prompt locally)."""
        return self is not WorkerRole.PREFILL

    @property
    def prefills(self) -> bool:
        """Whether it runs prompts that are sent to it (a decode worker prefills only the
        short prompts the router keeps local)."""
        return self is not WorkerRole.DECODE


class WorkerState(enum.Enum):
    """Whether a worker takes new orders (its role's), as its registry record says."""

    SERVING = "serving"
    # finishing its jobs before it changes role (worker.switch): routers send it nothing
    # new, the requests it holds go on to their end
    DRAINING = "draining"
