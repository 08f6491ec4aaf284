"""Gauges of the router's state and its view of the workers, read when Prometheus scrapes:
requests running and waiting in this router, the cluster's controller (role switches,
adaptive workers by role and state, the lease), and per worker (labelled by worker and role)
what its last heartbeat in the registry says: KV blocks used and free, running and waiting
requests, queued prefill tokens, leases, prefix-cache lookups and hits.

Contract: `collect` reads the router's objects without locks, so it must run on the
router's event loop (the HTTP server's /metrics handler does).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.router.metrics.requests import PREFIX
from pdserve.router.router import Router

_LABELS = ("worker", "role")


class ClusterCollector(Collector):
    def __init__(self, router: Router):
        self.router = router

    def collect(self) -> Iterator:
        workers = list(self.router.view.workers.values())
        # a disaggregated request is in flight on both its workers: count transfer ids once
        running = {tid for w in workers for tid in w.in_flight}
        yield GaugeMetricFamily(PREFIX + "num_requests_running",
                                "Requests this router has dispatched to workers.",
                                value=len(running))
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                "Requests in this router's queue, waiting for worker slots "
                                "and blocks.", value=self.router.queue.queued)
        by_role: dict[str, int] = {}
        for w in workers:
            by_role[w.record.role.value] = by_role.get(w.record.role.value, 0) + 1
        family = GaugeMetricFamily(PREFIX + "num_workers",
                                   "Live workers in this router's view, by role.",
                                   labels=("role",))
        for role, n in sorted(by_role.items()):
            family.add_metric((role,), n)
        yield family
        if self.router.controller is not None:
            yield from self._controller(self.router.controller)
        yield from self._per_worker(workers)

    def _controller(self, controller) -> Iterator:
        """Role switches the cluster's controller ordered (the totals in Redis, the same on
        every router), its adaptive workers by role and state, and whether this router
        leads."""
        switches = CounterMetricFamily(PREFIX + "role_switches",
                                       "Role switches the controller ordered, cluster-wide.",
                                       labels=("from_role", "to_role"))
        for (from_role, to_role), n in sorted(controller.totals.items()):
            switches.add_metric((from_role, to_role), n)
        yield switches
        adaptive = GaugeMetricFamily(PREFIX + "num_adaptive_workers",
                                     "Adaptive workers in this router's view, by role and "
                                     "state (serving, draining).", labels=("role", "state"))
        for (role, state), n in sorted(controller.per_role().items(),
                                       key=lambda kv: (kv[0][0].value, kv[0][1])):
            adaptive.add_metric((role.value, state), n)
        yield adaptive
        yield GaugeMetricFamily(PREFIX + "controller_leader",
                                "1 when this router's controller holds the lease.",
                                value=int(controller.leads))
        yield GaugeMetricFamily(PREFIX + "controller_epoch",
                                "The epoch of the controller's lease (its fencing token).",
                                value=controller.holder[1])

    def _per_worker(self, workers) -> Iterator:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=_LABELS)

        used = gauge("worker_kv_blocks_used", "KV blocks in use on the worker.")
        free = gauge("worker_kv_blocks_free", "Free KV blocks on the worker.")
        usage = gauge("worker_kv_cache_usage_perc", "Share of the worker's KV blocks in use "
                      "(0..1).")
        running = gauge("worker_num_requests_running", "Requests in the worker's running "
                        "batch.")
        waiting = gauge("worker_num_requests_waiting", "Requests waiting in the worker's "
                        "engine.")
        queued = gauge("worker_queued_prefill_tokens", "Prompt tokens queued for prefill on "
                       "the worker.")
        leases = gauge("worker_kv_leases", "Jobs holding KV under a lease on the worker.")
        in_flight = gauge("worker_in_flight", "Requests this router has on the worker.")
        hit_rate = gauge("worker_prefix_cache_hit_rate", "Prompt tokens found in the "
                         "worker's prefix cache over those looked up, since it started.")
        queries = CounterMetricFamily(PREFIX + "worker_prefix_cache_queries",
                                      "Prompt tokens looked up in the worker's prefix cache.",
                                      labels=_LABELS)
        hits = CounterMetricFamily(PREFIX + "worker_prefix_cache_hits",
                                   "Prompt tokens found in the worker's prefix cache.",
                                   labels=_LABELS)
        for w in sorted(workers, key=lambda w: w.worker_id):
            r, labels = w.record, (w.worker_id, w.record.role.value)
            used.add_metric(labels, r.total_blocks - r.free_blocks)
            free.add_metric(labels, r.free_blocks)
            usage.add_metric(labels, 1 - r.free_blocks / r.total_blocks if r.total_blocks
                             else 0.0)
            running.add_metric(labels, r.running)
            waiting.add_metric(labels, r.waiting)
            queued.add_metric(labels, r.queued_prefill_tokens)
            leases.add_metric(labels, r.leases)
            in_flight.add_metric(labels, len(w.in_flight))
            hit_rate.add_metric(labels, r.prefix_hit_tokens / r.prefix_query_tokens
                                if r.prefix_query_tokens else 0.0)
            queries.add_metric(labels, r.prefix_query_tokens)
            hits.add_metric(labels, r.prefix_hit_tokens)
        yield from (used, free, usage, running, waiting, queued, leases, in_flight, hit_rate,
                    queries, hits)
