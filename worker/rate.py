"""How fast a worker prefills, measured on its own steps: what admission control divides
queued prefill tokens by to tell how long a new prompt would wait for its first token;
and how long its decode-only steps take, the time per output token with no prompt in the
way (admission weighs what a prompt prefilled there would add to it).

The rate is prompt tokens over the wall time of every step taken while prompt tokens were
waiting, decode-only steps included: on a colocated worker those steps delay the queued
prompts as much as prefill steps do, so leaving them out would promise TTFTs the worker
cannot keep. Time with no prompt waiting says nothing and is not counted.
"""

from __future__ import annotations

from pdserve.engine.scheduler import ScheduledBatch

WINDOW_S = 0.2  # busy time per sample: long enough to hold several steps
MIN_PREFILL_TOKENS = 16  # a sample with fewer prompt tokens is mostly per-step overhead


def prefill_tokens(batch: ScheduledBatch) -> int:
    """Prompt tokens the step computes (decode tokens excluded)."""
    total = 0
    for item in batch.requests:
        prompt = item.request.num_prompt_tokens
        if item.start < prompt:
            total += min(item.end, prompt) - item.start
    return total


def decoding(batch: ScheduledBatch) -> int:
    """Sequences the step decodes (past their prompt)."""
    return sum(1 for item in batch.requests if item.start >= item.request.num_prompt_tokens)


class PrefillRate:
    """An exponential moving average of prompt tokens per second of busy time (see the
    module), sampled every WINDOW_S of it, when the backlog drains and when the engine
    idles; 0.0 until the first sample."""

    def __init__(self, weight: float = 0.3):
        self.weight = weight
        self.tokens_per_s = 0.0
        self._tokens = 0
        self._seconds = 0.0

    def observe(self, num_prefill_tokens: int, seconds: float, backlog: bool) -> None:
        """A step computed `num_prefill_tokens` prompt tokens in `seconds`; `backlog`: prompt
        tokens were waiting when it began."""
        if backlog or num_prefill_tokens:
            self._tokens += num_prefill_tokens
            self._seconds += seconds
            if self._seconds < WINDOW_S:
                return
        self.flush()

    def flush(self) -> None:
        """Take the sample gathered so far (the backlog drained, or the engine went idle)."""
        tokens, seconds = self._tokens, self._seconds
        self._tokens, self._seconds = 0, 0.0
        if tokens < MIN_PREFILL_TOKENS or seconds <= 0:
            return
        rate = tokens / seconds
        w = self.weight if self.tokens_per_s else 1.0
        self.tokens_per_s += w * (rate - self.tokens_per_s)


class DecodeStepTime:
    """An exponential moving average of the wall time of steps that computed no prompt
    token (only decodes); 0.0 until the first. And what prompt chunks add to the steps
    that decode, per such step (`stall_s`): a step that carries both takes longer than a
    decode-only one by the chunk's time, and every sequence decoding there waits for it;
    averaged over every step that decodes (decode-only ones add nothing), it is what the
    worker's prefills add to each output token at today's load (a decode worker fed by
    prefill workers adds none). Its weight is smaller: a chunk's step is rare and long,
    so a short average would swing with each one."""

    def __init__(self, weight: float = 0.1, stall_weight: float = 0.03):
        self.weight, self.stall_weight = weight, stall_weight
        self.seconds = 0.0
        self.stall_s = 0.0

    def observe(self, num_prefill_tokens: int, num_decodes: int, seconds: float) -> None:
        """A step of `num_decodes` decoding sequences and `num_prefill_tokens` prompt
        tokens took `seconds`."""
        if not num_decodes:
            return
        if num_prefill_tokens:
            if self.seconds:  # its stall is the excess over a decode-only step
                self.stall_s += self.stall_weight * (max(seconds - self.seconds, 0.0)
                                                     - self.stall_s)
            return
        w = self.weight if self.seconds else 1.0
        self.seconds += w * (seconds - self.seconds)
        self.stall_s -= self.stall_weight * self.stall_s
