"""The decode worker and the colocated baseline: decode and stream tokens to the router."""

from pdserve.decode_worker.colocated import ColocatedWorker
from pdserve.decode_worker.jobs import DecodeState
from pdserve.decode_worker.worker import DecodeWorker

__all__ = ["ColocatedWorker", "DecodeState", "DecodeWorker"]
