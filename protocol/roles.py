"""What a worker does in the cluster: one enum from the CLI to the registry."""

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
