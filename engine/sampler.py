"""Turn a step's logits into tokens: greedy, temperature, top-k, top-p, per-request seeds.

A request with a `seed` draws from its own generator, so its tokens do not depend on which
other requests share its batch. The engine calls `forget` when a request leaves.

Each row is sampled on its own: a row whose logits are not finite, or whose sampling
raises, yields a `SampleFailure` for that row alone, and the other rows get the tokens they
would have got without it. Every parameter SamplingParams accepts is computable here: the
row is upcast to float32 before any arithmetic, greedy covers temperatures below the floor
where a division would overflow, and the filters always keep the most likely token, so a
row of finite logits never turns into NaN probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.request import SamplingParams


@dataclass(frozen=True)
class SampleFailure:
    """Why one row has no token; the engine fails that request alone."""

    reason: str


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def sample(
        self,
        logits: torch.Tensor,  # [num_rows, vocab_size]
        request_ids: Sequence[str],
        params: Sequence[SamplingParams],
    ) -> list[int | SampleFailure]:
        """One token, or the reason there is none, per row. Raises only when the batch as a
        whole cannot be read (a tensor op over every row failed)."""
        logits = logits.float()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        out: list[int | SampleFailure] = logits.argmax(dim=-1).tolist()
        for row, (request_id, p) in enumerate(zip(request_ids, params, strict=True)):
            if not finite[row]:
                out[row] = SampleFailure("the logits hold NaN/inf")
            elif not p.is_greedy:
                try:
                    out[row] = self._sample_row(request_id, logits[row], p)
                except Exception as e:  # noqa: BLE001 - this row fails, the batch goes on
                    out[row] = SampleFailure(f"{type(e).__name__}: {e}")
        return out

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def _generator(self, request_id: str, p: SamplingParams) -> torch.Generator:
        if p.seed is None:
            return self.generator
        g = self._request_generators.get(request_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(p.seed)
            self._request_generators[request_id] = g
        return g

    def _sample_row(self, request_id: str, logits: torch.Tensor, p: SamplingParams) -> int:
        """`logits` `[vocab_size]` float32, all finite; `p` not greedy."""
        # temperature >= SAMPLING_EPS: finite logits stay finite; a huge one gives zeros
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p. The top token stays whatever
            # top_p is: one below float32's range compares as 0 and would drop every token.
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            drop[0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(request_id, p)).item())
