"""pdserve's inference engine: a Llama-family model over a paged KV cache.

`SamplingParams` is the contract's (pdserve.protocol), exported here too for offline use."""

from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError
from pdserve.engine.config import (
    CacheConfig,
    EngineConfig,
    EngineMode,
    ModelConfig,
    SchedulerConfig,
)
from pdserve.engine.engine import Engine, EngineStats, StepKVHook, WarmUp
from pdserve.engine.llm import LLM, CompletionOutput
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import (
    RequestOutput,
    ReservedBlocks,
    ScheduledBatch,
    ScheduledRequest,
)
from pdserve.models import BUILTIN_MODELS, DEFAULT_MODEL, resolve_model
from pdserve.protocol import SamplingParams

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "LLM",
    "BlockManager",
    "CacheConfig",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineMode",
    "EngineStats",
    "ModelConfig",
    "NoFreeBlocksError",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "ReservedBlocks",
    "SamplingParams",
    "ScheduledBatch",
    "ScheduledRequest",
    "SchedulerConfig",
    "StepKVHook",
    "WarmUp",
    "resolve_model",
]
