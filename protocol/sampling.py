"""How a request picks its tokens: validated once, where it is built (the router for served
requests, `LLM` for offline ones), and carried unchanged to every worker."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

MAX_STOP_STRINGS = 16
# Temperatures below this are greedy, as in vLLM (its _SAMPLING_EPS): dividing logits by a
# smaller one overflows float32 (30 / 1e-38 is inf) and the softmax turns to NaN, while the
# distribution it asks for is the argmax anyway.
SAMPLING_EPS = 1e-5
# torch's generators take a 64-bit seed; a negative one stands for its two's complement.
SEED_RANGE = range(-(1 << 63), 1 << 64)


class InvalidField(ValueError):
    """A value the caller gave is refused; `field` names it as the caller's API spells it
    (`max_tokens`, `stop[2]`), so a server can say which field of a request is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; every value that passes can be computed.

    - `temperature` >= 0 and finite. Below `SAMPLING_EPS` (1e-5, vLLM's floor), 0 included,
      sampling is greedy (argmax) and `top_k`, `top_p` and `seed` have no effect. A huge
      temperature flattens the distribution towards uniform.
    - `top_k` >= 0; 0 disables it, and so does any value >= the vocabulary size.
    - `top_p` in (0, 1]; 1 disables it. The most likely token is always kept, so a tiny
      `top_p` samples the argmax.
    - `seed` None (the engine's shared generator) or an integer in [-2**63, 2**64): a
      per-request generator, so the request's tokens do not depend on its batch.
    - `stop` strings are matched on text by whoever detokenizes (`LLM`, the router); the
      engine itself stops on `stop_token_ids`, EOS (unless `ignore_eos`) and `max_tokens`.
    Raises InvalidField naming the first bad field."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists (and a lone string) from callers; keep the value hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidField("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not (_is_number(self.temperature) and self.temperature >= 0
                and _is_finite(self.temperature)):
            raise InvalidField("temperature", f"must be a finite number >= 0, got "
                                              f"{self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidField("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidField("top_k", f"must be an integer >= 0 (0 disables it), got "
                                        f"{self.top_k!r}")
        if self.seed is not None and not (_is_int(self.seed) and self.seed in SEED_RANGE):
            raise InvalidField("seed", f"must be an integer in [-2**63, 2**64), got "
                                       f"{self.seed!r}")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidField("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for i, text in enumerate(stop):
            if not isinstance(text, str) or not text:
                raise InvalidField(f"stop[{i}]", "must be a non-empty string")
        for i, t in enumerate(self.stop_token_ids):
            if not _is_int(t) or t < 0:
                raise InvalidField(f"stop_token_ids[{i}]", f"must be a token id >= 0, got {t!r}")

    @property
    def is_greedy(self) -> bool:
        """Whether the engine takes the argmax (temperature below `SAMPLING_EPS`)."""
        return self.temperature < SAMPLING_EPS

    def check_vocab(self, vocab_size: int) -> None:
        """Raises InvalidField for a stop token id outside the model's vocabulary."""
        for i, t in enumerate(self.stop_token_ids):
            if t >= vocab_size:
                raise InvalidField(f"stop_token_ids[{i}]",
                                   f"{t} is outside the vocabulary [0, {vocab_size})")

    def stops_on(self, token_id: int, eos_token_ids: Collection[int]) -> bool:
        """Whether sampling `token_id` ends the request (EOS unless ignored, or a stop id)."""
        return ((not self.ignore_eos and token_id in eos_token_ids)
                or token_id in self.stop_token_ids)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False
