"""The contract between the router and the workers, declared once and torch-free: worker
roles, the worker record, sampling parameters, prefill and decode orders and their
outcomes, the stream codec and stage stamps, finish reasons, the prefix hash chain, what a
model folder says about its limits and EOS, the stop-string detokenizer, the cluster's
CURVE keys, and the cost profile (what a step, a KV transfer and the router's path cost)
that `pdserve profile` writes and the router and the simulator read.

It imports nothing of pdserve; the router, the engine, the workers, deploy and bench all
speak it and nothing re-declares it."""

from pdserve.protocol.cost_profile import CostProfile, StepModel, TransferModel, chunk_pairs
from pdserve.protocol.detok import IncrementalDetokenizer
from pdserve.protocol.keys import CurveKeys
from pdserve.protocol.model_info import ModelLimits, read_model_limits
from pdserve.protocol.orders import (
    DecodeOrder,
    FinishReason,
    PrefillOrder,
    PrefillOutcome,
    PrefillStatus,
    Reservation,
)
from pdserve.protocol.prefix import block_hashes, hash_block
from pdserve.protocol.record import WorkerRecord
from pdserve.protocol.roles import WorkerRole, WorkerState
from pdserve.protocol.sampling import InvalidField, SamplingParams
from pdserve.protocol.stamps import DecodeStamps, Handoff, PrefillStamps
from pdserve.protocol.stream import PrefillReport, TokenBatch, TokenChunk

__all__ = [
    "CostProfile", "CurveKeys", "DecodeOrder", "DecodeStamps", "FinishReason", "Handoff",
    "IncrementalDetokenizer", "InvalidField", "ModelLimits", "PrefillOrder", "PrefillOutcome",
    "PrefillReport", "PrefillStamps", "PrefillStatus", "Reservation", "SamplingParams",
    "StepModel", "TokenBatch", "TokenChunk", "TransferModel", "WorkerRecord", "WorkerRole",
    "WorkerState", "block_hashes", "hash_block", "read_model_limits", "chunk_pairs",
]
