"""The prefill worker: runs prompts and streams their KV to decode workers (DESIGN §2)."""

from pdserve.prefill_worker.jobs import PrefillState
from pdserve.prefill_worker.worker import PrefillWorker

__all__ = ["PrefillState", "PrefillWorker"]
