"""The prefill worker: runs prompts and streams their KV to decode workers (DESIGN §2)."""

from pdserve.prefill_worker.job import PrefillJob, PrefillResult, PrefillStamps, PrefillState
from pdserve.prefill_worker.worker import PrefillWorker, PrefillWorkerConfig

__all__ = ["PrefillJob", "PrefillResult", "PrefillStamps", "PrefillState", "PrefillWorker",
           "PrefillWorkerConfig"]
