"""Turn a step's logits into tokens: greedy, temperature, top-k, top-p, per-request seeds.

A request with a `seed` draws from its own generator, so its tokens do not depend on which
other requests share its batch. The engine calls `forget` when a request leaves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.request import SamplingParams


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def sample(
        self,
        logits: torch.Tensor,  # [num_rows, vocab_size] float32
        request_ids: Sequence[str],
        params: Sequence[SamplingParams],
    ) -> list[int]:
        out = logits.argmax(dim=-1).tolist()
        for row, (request_id, p) in enumerate(zip(request_ids, params, strict=True)):
            if not p.is_greedy:
                out[row] = self._sample_row(logits[row], p, self._generator(request_id, p))
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

    @staticmethod
    def _sample_row(logits: torch.Tensor, p: SamplingParams, g: torch.Generator) -> int:
        logits = logits / p.temperature  # [vocab_size]
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            mass_before = probs.cumsum(-1) - probs
            sorted_logits = sorted_logits.masked_fill(mass_before >= p.top_p, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=g).item())
