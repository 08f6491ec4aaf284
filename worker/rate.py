"""How fast a worker prefills, measured on its own steps: what admission control divides
queued prefill tokens by to tell how long a new prompt would wait for its first token."""

from __future__ import annotations

from pdserve.engine.scheduler import ScheduledBatch

# A step with fewer prompt tokens than this is mostly per-step overhead (a decode step):
# it says little about the prefill rate and would drag the estimate down.
MIN_PREFILL_TOKENS = 16


def prefill_tokens(batch: ScheduledBatch) -> int:
    """Prompt tokens the step computes (decode tokens excluded)."""
    total = 0
    for item in batch.requests:
        prompt = item.request.num_prompt_tokens
        if item.start < prompt:
            total += min(item.end, prompt) - item.start
    return total


class PrefillRate:
    """An exponential moving average of prompt tokens per second of step time, over the
    steps that prefill at least MIN_PREFILL_TOKENS tokens; 0.0 until the first one."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self.tokens_per_s = 0.0

    def observe(self, num_prefill_tokens: int, num_tokens: int, seconds: float) -> None:
        """A step of `num_tokens` tokens, `num_prefill_tokens` of them prompt tokens, took
        `seconds`; the step's rate counts all its tokens, since all of them took its time."""
        if num_prefill_tokens < MIN_PREFILL_TOKENS or seconds <= 0:
            return
        rate = num_tokens / seconds
        w = self.weight if self.tokens_per_s else 1.0
        self.tokens_per_s += w * (rate - self.tokens_per_s)
