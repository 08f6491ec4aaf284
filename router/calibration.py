"""Online correction of the predicted time to first token and per output token, per
worker: what the router measures against what the cost profile predicts.

The cost profile is measured once (`pdserve profile`), often on another day or under
another load; a worker then runs steadily faster or slower than it predicts (a host now
shared, a warmer cache, a queue the profile's per-chunk cost compounds). Each request
whose admission predicted its first token moves, when that first token comes
(`first_token`: not when the request ends, a whole decode later, by which time a chat
workload has admitted another ten or twenty requests on the stale scale), the TTFT scale
of the worker that prefilled it, one scale for the prompts it prefilled for
another worker to decode (`ttft`) and one for those it prefilled where it decodes
(`local_ttft`): the two run different steps (a prefill worker's, queued behind other
prompts; mixed steps beside a decoding batch), and an adaptive worker that changed roles
keeps the scale its new role learned, not the other's. Each moves by a step toward
measured / predicted in log space (the mean of the
ratios seen, until there are 1 / STEP of them: a run's first requests, or warm-up, find a
stale profile corrected already). A ratio beyond CLIP counts as CLIP: a request that
waited for something the scale does not stand for (a long step of another worker, a burst
that came after it) moves the scale no further than one that was CLIP off, so the scale
follows what most requests measure (its fixed point lies between their mean and their
median ratio) and the predictions it multiplies err about as often long as short. A scale
stays within SCALE_BOUNDS: more than that is a glitch, not a trend.

A TPOT is corrected by the decode worker's own measure instead: its decode step time
against the profile's for the batch it reports (router.predict's decode_scale, every
heartbeat while it decodes; `decode` keeps the last one for while it decodes nothing).
Not by the requests' measured TPOTs: a request's TPOT is the step time of the batches it
decoded in, which grew or shrank with what was admitted after it, so a scale learned from
them would apply a past load's growth to predictions that already count today's batch
(the first requests of a burst decode in the batch the burst grew, and would teach it a
ratio that then refuses the burst's later requests on a batch the worker decodes within
their SLO).

Told by the router (router.router), on its event loop; nothing is persisted: a new
router starts at 1.0 for every worker. A first token that came on a second dispatch is
left out (it waited for a failure, not for the worker).
"""

from __future__ import annotations

import math

# how far measurement may move the profile's predictions: a profile from another day, or a
# host now shared or quieter, is off by up to 2-3x; more is a glitch, not a trend
SCALE_BOUNDS = (0.25, 4.0)
STEP = 0.2  # of the log ratio per request: about ten requests to follow a shift
CLIP = 2.0  # the largest ratio one request counts for, either way


class Scales:
    """One kind of prediction's scale per worker."""

    def __init__(self, step: float = STEP):
        if not 0 < step <= 1:
            raise ValueError(f"step must be in (0, 1], got {step}")
        self.step = step
        self._log: dict[str, float] = {}
        self._seen: dict[str, int] = {}

    def scale(self, worker_id: str) -> float:
        """What the profile's predictions for the worker are multiplied by (1.0 until one
        of its requests has finished)."""
        return math.exp(self._log.get(worker_id, 0.0))

    def observe(self, worker_id: str, predicted_s: float, measured_s: float) -> None:
        """One request on `worker_id`: predicted (with the scale of the time) against
        measured. Ignored without both."""
        if predicted_s <= 0 or measured_s <= 0 or not worker_id:
            return
        lo, hi = (math.log(b) for b in SCALE_BOUNDS)
        seen = self._seen.get(worker_id, 0)
        self._seen[worker_id] = seen + 1
        # the mean of the first ratios, then the moving step: the first request already
        # corrects a profile that is 2x off, instead of the first ten
        step = max(self.step, 1 / (seen + 1))
        clip = math.log(CLIP)
        ratio = min(max(math.log(measured_s / predicted_s), -clip), clip)
        moved = self._log.get(worker_id, 0.0) + step * ratio
        self._log[worker_id] = min(max(moved, lo), hi)


class Calibration:
    def __init__(self, step: float = STEP):
        self.ttft = Scales(step)  # prompts prefilled for another worker, by the prefiller
        self.local_ttft = Scales(step)  # prompts prefilled where they decode
        # each worker's last measured decode step over the profile's (router.predict's
        # decode_scale): what it holds while the worker decodes nothing
        self.decode: dict[str, float] = {}

    def first_token(self, prefill_worker: str, decode_worker: str, predicted_s: float,
                    measured_s: float) -> None:
        """A request's first token came, on its first dispatch: `measured_s` after its
        arrival, where admission predicted `predicted_s` (0.0: nothing predicted, ignored);
        prefilled on `prefill_worker` for `decode_worker`, or where it decodes ("")."""
        if prefill_worker:
            self.ttft.observe(prefill_worker, predicted_s, measured_s)
        else:
            self.local_ttft.observe(decode_worker, predicted_s, measured_s)

    def ttft_scale(self, worker_id: str, local: bool) -> float:
        """The worker's TTFT scale for a prompt prefilled where it decodes (`local`) or
        for another worker."""
        return (self.local_ttft if local else self.ttft).scale(worker_id)
