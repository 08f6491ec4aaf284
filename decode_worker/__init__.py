"""The decode worker (and the colocated baseline): decodes and streams tokens to the router."""

from pdserve.decode_worker.job import DecodeJob, DecodeStamps, DecodeState
from pdserve.decode_worker.stream import StreamFinish, TokenBatch, TokenChunk
from pdserve.decode_worker.worker import ColocatedWorker, DecodeWorker, DecodeWorkerConfig

__all__ = ["ColocatedWorker", "DecodeJob", "DecodeStamps", "DecodeState", "DecodeWorker",
           "DecodeWorkerConfig", "StreamFinish", "TokenBatch", "TokenChunk"]
