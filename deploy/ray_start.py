"""Joining Ray, or starting a local instance of it: the first step of a Ray deployment
(deploy.ray_cluster), apart from the rest so that `pdserve serve` can take it before it
imports the engine's modules. A local instance's start and the driver's import of torch
(the cluster spec's engine configs) then run side by side instead of one after the other
(bench/README.md, "Cold start").

Contract: `start_ray` returns True when it called `ray.init` (a local instance started, or
a running cluster joined): the caller owns that connection and ends it with
`ray.shutdown()`, or hands it to a `RayCluster(..., ray_started=True)`, which does. It
returns False, touching nothing, when Ray is initialised in this process already. Errors
are ray.init's own.
"""

from __future__ import annotations

import os

import ray

NAMESPACE = "pdserve"  # the worker actors' names live here


def start_ray(address: str | None, cpus: int) -> bool:
    """Join Ray at `address`, or start a local instance with at least `cpus` CPUs (a CPU
    per worker thread: on a small machine the workers share cores rather than wait)."""
    if ray.is_initialized():
        return False
    extra = {} if address else {"num_cpus": max(os.cpu_count() or 1, cpus)}
    ray.init(address=address, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False, configure_logging=False, **extra)
    return True
