"""What every worker is built on: its frozen config, the engine loop that drives the engine
from its own thread, the job-table seam, the stream publisher to the routers, and the
common face (`Worker`) that the prefill, decode and colocated workers share."""

from pdserve.worker.base import JobTable, Worker
from pdserve.worker.config import ENGINE_MODES, WorkerConfig
from pdserve.worker.loop import EngineLoop, LoadReport, LoopHandler

__all__ = ["ENGINE_MODES", "EngineLoop", "JobTable", "LoadReport", "LoopHandler", "Worker",
           "WorkerConfig"]
