"""A request's time to first token and per output token on given workers, predicted from a
cost profile (protocol.cost_profile, what `pdserve profile` fits to the real engine): what
admission, the choice between prefilling where the request decodes or on a prefill worker,
and the choice of workers compare. Pure functions of what the router knows of a worker
(`Side`: its record, plus what this router sent it since the record was written).

A prefill worker runs its queue, then the prompt, in steps of its chunk budget (the tokens
its prefix cache holds are not computed); a decode or colocated worker's prefill steps
carry its decoding batch as well (decodes first, the prompt's chunk in the rest of the
budget: a mixed step). Step times are the profile's step model; the queued prompts' own
attention is counted as if each chunk started a prompt (their lengths are not reported).
A queue this router counted itself (router.ledger) is taken less what the worker has
computed of it by now, at the profile's pace from the moment each prompt was sent, and
less what its step in progress has run.

Disaggregated: router_s + the prefill worker's queue and the prompt's prefill there + the
KV transfer's tail + the decode worker's wait for a step boundary + stream_s. That wait is
the rest of the step in progress when the KV arrives if the decode worker is then still
prefilling prompts of its own (a mixed step can take seconds), else half a decode step.
The KV streams layer by layer while the prefill computes; what is left once the last
layer is computed is that layer's share, plus whatever the wire could not keep up with.
Only the blocks the decode worker lacks are sent.
Local: router_s + the worker's queue and the prompt's mixed steps + stream_s. The
request's TPOT is one decode step of the worker's batch with the request in it (its KV:
every block the worker holds, and the prompt), scaled by what the worker measures of its
own decode steps against the profile's for its reported batch (within the calibration's
SCALE_BOUNDS: the profile may be of another day, or another machine's speed), plus what
the worker measures its prompt chunks to add to each step that decodes (a colocated
worker's local prefills; none on a decode worker fed by prefill workers). A TTFT is
scaled by what the router measured of those it predicted for prompts prefilled on the same
worker, in the same way (router.calibration: remote and local prompts each have theirs).
A local prefill stalls the worker's decodes by what its mixed steps take beyond the
decode-only steps they replace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.protocol import CostProfile, WorkerRecord, WorkerRole, chunk_pairs
from pdserve.router.calibration import SCALE_BOUNDS, Calibration

DEFAULT_CHUNK = 2048  # a worker that does not report its budget: the engine's default


@dataclass(frozen=True)
class Side:
    """One worker as a prediction sees it, made for one placement: what a prediction
    derives from it alone (`Predictor.queued`) is kept on it: a placement predicts every
    (prefill, decode) pair of its candidates over the same sides."""

    record: WorkerRecord
    queued_tokens: int  # prompt tokens ahead of a new one (the larger of report and ledger)
    batch: int  # sequences decoding there (the larger of report and this router's own)
    cached_tokens: int = 0  # the prompt's leading tokens its prefix cache holds
    # when `queued_tokens` is this router's count (router.ledger): (seconds since sent,
    # prompt tokens) of each prompt in it, the oldest first; empty when it is the report's
    sent: tuple[tuple[float, int], ...] = ()
    _queued: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def chunk(self) -> int:
        return self.record.chunk_tokens or DEFAULT_CHUNK

    @property
    def context(self) -> int:
        """KV tokens the worker holds: what its decoding sequences read each step."""
        r = self.record
        return (r.total_blocks - r.free_blocks) * r.block_size


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    stall_s: float = 0.0  # what a local prefill adds to each decoding request's time there
    # the worst TPOT, over its SLO, of the requests already decoding there once a local
    # prefill's stall is charged to them (router.interference); 0.0: none to protect
    others_tpot_ratio: float = 0.0
    # the worst TTFT, over its SLO, of the remote requests whose KV is on its way to that
    # worker once a local prefill's steps are charged to them (router.incoming); 0.0: none
    others_ttft_ratio: float = 0.0
    # the time a local prefill's stall adds to the requests decoding there that set no
    # TPOT SLO, summed over them (router.placement); 0.0: none, or a remote prefill
    others_delay_s: float = 0.0


class Predictor:
    def __init__(self, profile: CostProfile, calibration: Calibration | None = None):
        """`calibration`: what the router measured of the TTFTs it predicted, and of the
        workers' decode steps, per worker (a fresh one, every scale 1.0, by default); the
        router tells it each first token (router.calibration)."""
        self.profile = profile
        self.step = profile.step
        self.calibration = calibration or Calibration()

    def decode_step_s(self, seqs: int, context: int) -> float:
        """A decode-only step of `seqs` sequences reading `context` KV tokens in all."""
        if seqs <= 0:
            return 0.0
        return self.step.step_s(seqs, 0, context, seqs) + self.profile.serve_seq_s * seqs

    def prefill_s(self, queued: int, prompt: int, offset: int, chunk: int,
                  seqs: int = 0, context: int = 0) -> tuple[float, float]:
        """(seconds until the prompt's last chunk is computed, what the prompt's own steps
        take beyond the decode-only steps of `seqs` sequences): `queued` tokens ahead, then
        `prompt` new tokens after `offset` cached ones, in steps of `chunk` tokens shared
        with `seqs` decoding sequences that read `context` KV tokens."""
        budget = max(chunk - seqs, 1)
        decode_only = self.decode_step_s(seqs, context)
        full, rest = divmod(queued, budget)  # whole steps of queued work cost the same
        total = full * self._mixed(budget, chunk_pairs(0, budget), seqs, context) if full \
            else 0.0
        stall = 0.0
        left, done = prompt, offset
        while left > 0:
            k = min(left, budget - rest)
            t = self._mixed(rest + k, chunk_pairs(0, rest) + chunk_pairs(done, k), seqs,
                            context)
            total += t
            stall += max(t - decode_only, 0.0)
            rest, left, done = 0, left - k, done + k
        return total, stall

    def step_end_s(self, queued: int, chunk: int, seqs: int, context: int,
                   at_s: float) -> float:
        """From `at_s` seconds from now to the end of the step then in progress on a worker
        that prefills its `queued` prompt tokens from now on, in steps of `chunk` tokens
        beside `seqs` decoding sequences (as `prefill_s` counts a queue); 0.0 when that
        work is done by then."""
        if queued <= 0:
            return 0.0
        budget = max(chunk - seqs, 1)
        full, rest = divmod(queued, budget)
        step = self._mixed(budget, chunk_pairs(0, budget), seqs, context)
        if at_s < full * step:
            return math.ceil(at_s / step) * step - at_s if at_s > 0 else step
        end = full * step + (self._mixed(rest, chunk_pairs(0, rest), seqs, context)
                             if rest else 0.0)
        return end - at_s if at_s < end else 0.0

    def queued(self, side: Side, seqs: int = 0, context: int = 0) -> tuple[int, float]:
        """(the prompt tokens still ahead on the worker, how long its step in progress has
        run): its queue (`Side.queued_tokens`) less what it has computed by now of the
        prompts this router sent it, had it run them one after the other from the moment
        each was sent, at the profile's pace (beside `seqs` decoding sequences reading
        `context` KV tokens) times its TTFT scale; whole steps only: a step's tokens count
        once it ends; never less than the worker last reported. (queued_tokens, 0.0) for a
        queue the worker reported."""
        if not side.sent:
            return side.queued_tokens, 0.0
        key = (seqs, context)
        if key not in side._queued:
            side._queued[key] = self._queued(side, seqs, context)
        return side._queued[key]

    def _queued(self, side: Side, seqs: int, context: int) -> tuple[int, float]:
        scale = self.calibration.ttft_scale(side.record.worker_id,
                                            side.record.role is not WorkerRole.PREFILL)
        budget = max(side.chunk - seqs, 1)
        done, ran, free_at = 0, 0.0, -side.sent[0][0]  # in seconds from now
        for age, tokens in side.sent:
            start = max(free_at, -age)  # <= 0: the one before it has ended
            took = self.prefill_s(0, tokens, 0, side.chunk, seqs, context)[0] * scale
            if start + took <= 0:
                done, free_at = done + tokens, start + took
                continue
            step = took / -(-tokens // budget)
            steps = int(-start / step)
            done += min(tokens, steps * budget)
            ran = -start - steps * step
            break
        left = side.queued_tokens - done
        reported = side.record.queued_prefill_tokens
        if left < reported:  # slower than the profile's pace: the worker knows better
            return reported, 0.0
        return left, ran if left else 0.0

    def _mixed(self, tokens: int, pairs: int, seqs: int, context: int) -> float:
        return (self.step.step_s(tokens + seqs, pairs, context, seqs)
                + self.profile.serve_seq_s * seqs)

    def decode_scale(self, side: Side) -> float:
        """The worker's measured decode step over the profile's for its reported batch;
        while it decodes nothing, the last such ratio (1.0 until it has measured one)."""
        r = side.record
        if r.decode_step_s <= 0 or r.running <= 0:
            return self.calibration.decode.get(r.worker_id, 1.0)
        predicted = self.decode_step_s(r.running, side.context)
        if predicted <= 0:
            return 1.0
        lo, hi = SCALE_BOUNDS
        scale = self.calibration.decode[r.worker_id] = min(max(r.decode_step_s / predicted,
                                                               lo), hi)
        return scale

    def tpot_s(self, decode: Side, prompt: int) -> float:
        """The request's time per output token on the decode side, with it in the batch,
        and what the worker's prompt chunks add to each of its decoding steps today."""
        step = self.decode_step_s(decode.batch + 1, decode.context + prompt)
        return step * self.decode_scale(decode) + decode.record.prefill_stall_s

    def remote(self, prefill: Side, decode: Side, prompt: int) -> Prediction:
        p = self.profile
        hit = min(prefill.cached_tokens, prompt - 1)
        queued, ran = self.queued(prefill)
        own = self.prefill_s(0, prompt - hit, hit, prefill.chunk)[0]
        compute = max(self.prefill_s(queued, prompt - hit, hit, prefill.chunk)[0] - ran, own)
        sent = (prompt - min(decode.cached_tokens, prompt - 1)) * p.kv_bytes_per_token
        wire = sent / p.transfer.bytes_per_s
        tail = p.transfer.latency_s + wire / p.num_layers + max(0.0, wire - own)
        tpot = self.tpot_s(decode, prompt)
        arrival = p.router_s + compute + tail
        # the KV is admitted between two steps: at the end of the step in progress when it
        # arrives, if the decode worker is still prefilling prompts of its own then (a long
        # mixed step), else half a decode step, on average
        queued, ran = self.queued(decode, decode.batch, decode.context)
        admit = (self.step_end_s(queued, decode.chunk, decode.batch, decode.context,
                                 arrival + ran)
                 or self.decode_step_s(decode.batch, decode.context)
                 * self.decode_scale(decode) / 2)
        ttft = arrival + admit + p.stream_s
        return Prediction(ttft * self.calibration.ttft_scale(prefill.record.worker_id, False),
                          tpot)

    def local(self, decode: Side, prompt: int) -> Prediction:
        p = self.profile
        hit = min(decode.cached_tokens, prompt - 1)
        queued, ran = self.queued(decode, decode.batch, decode.context)
        args = (prompt - hit, hit, decode.chunk, decode.batch, decode.context)
        compute, stall = self.prefill_s(queued, *args)
        compute = max(compute - ran, self.prefill_s(0, *args)[0])
        ttft = (p.router_s + compute + p.stream_s) * self.calibration.ttft_scale(
            decode.record.worker_id, True)
        return Prediction(ttft, self.tpot_s(decode, prompt), stall)
