"""Turn a scheduled batch into tensors, run the model, return the logits of sampling rows.

Owns the model weights, the paged KV cache and the attention backend. Makes no scheduling
decision: which tokens run and which blocks they go to is the scheduler's output.
"""

from __future__ import annotations

import torch

from pdserve.engine.attention import SeqSlice, select_backend
from pdserve.engine.config import CacheLayout, EngineConfig
from pdserve.engine.host_memory import tune_malloc
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.model.llama import LayerKVHook
from pdserve.engine.model.loader import load_model
from pdserve.engine.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, config: EngineConfig, layout: CacheLayout):
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            tune_malloc()
        self.model = load_model(config.model, self.device, config.torch_dtype)
        self.kv_cache = PagedKVCache(layout, config.model, config.torch_dtype, self.device)
        self.backend = select_backend(config.device, layout.block_size, config.torch_dtype)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, hook: LayerKVHook | None = None) -> torch.Tensor:
        """Run one step. Returns logits `[num_sampling_requests, vocab_size]` (float32), one
        row per request of `batch` whose `samples` is true, in batch order."""
        bs = self.kv_cache.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SeqSlice] = []
        sample_rows: list[int] = []
        for item in batch.requests:
            request = item.request
            table = request.block_ids
            input_ids += request.token_ids_slice(item.start, item.end)
            span = range(item.start, item.end)
            positions += span
            slots += [table[p // bs] * bs + p % bs for p in span]
            seqs.append(SeqSlice(item.start, item.num_new_tokens, list(table)))
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
        dev = self.device
        meta = self.backend.build(seqs, bs, dev)
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_cache,
            torch.tensor(slots, dtype=torch.long, device=dev),
            self.backend,
            meta,
            hook,
        )
        rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden[rows])
