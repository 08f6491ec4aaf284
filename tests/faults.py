"""In-test fault injection around a real engine: the logits of chosen requests turn to NaN, or
a batch holding a chosen request raises in the model's forward. It wraps the engine's
`runner.execute` from outside; the engine itself is unchanged and does not know."""

from __future__ import annotations

import torch

from pdserve.engine import Engine, ScheduledBatch


class InjectedFault(RuntimeError):
    pass


class Faults:
    """Install on `engine`; then `nan_logits(rid)` or `raise_in_forward(rid)` before the
    request runs. Safe to arm from another thread before the request is submitted."""

    def __init__(self, engine: Engine):
        self._execute = engine.runner.execute
        self._nan: dict[str, int] = {}  # request id -> output tokens it has before the fault
        self._raise: set[str] = set()
        engine.runner.execute = self._faulty_execute

    def nan_logits(self, request_id: str, after_tokens: int = 0) -> None:
        """The request's logits row is NaN from the step where it has `after_tokens` output
        tokens on (0: the step that samples its first token)."""
        self._nan[request_id] = after_tokens

    def raise_in_forward(self, request_id: str) -> None:
        """The model's forward raises for every batch that holds the request."""
        self._raise.add(request_id)

    def _faulty_execute(self, batch: ScheduledBatch, hook=None):
        ids = [s.request.request_id for s in batch.requests]
        if self._raise.intersection(ids):
            raise InjectedFault("injected forward fault")
        logits = self._execute(batch, hook)
        sampling = [s.request for s in batch.requests if s.samples]
        for row, request in enumerate(sampling):
            after = self._nan.get(request.request_id)
            if after is not None and request.num_output_tokens >= after:
                with torch.inference_mode():  # the runner's logits are inference tensors
                    logits[row] = float("nan")
        return logits
