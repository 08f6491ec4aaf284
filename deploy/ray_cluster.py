"""pdserve on a Ray cluster: worker actors placed by resources or placement groups, Redis,
and the router's gRPC server in this (the driver's) process.

Life of a cluster:
1. `RayCluster(spec, placement)` joins Ray at `ray_address` (or starts a local instance),
   starts the embedded Redis unless a URL is given, creates one named actor per worker
   (`pdserve` namespace) where `placement` says, waits until each has loaded its model and
   registered, then starts the router; `address` is its gRPC endpoint, `http` its
   HTTP server's configuration (None for none).
2. A dead actor is restarted by Ray (up to `max_restarts`) and registers a new
   incarnation; the router fails the old one's requests and routes to the new one.
3. `close()` stops the router, kills the actors, removes placement groups, stops Redis
   and, if this object started Ray, shuts it down.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from pdserve.deploy.handles import handle_for
from pdserve.deploy.logs import runtime_env
from pdserve.deploy.ray_actors import NAMESPACE, RayCalls, WorkerActor
from pdserve.deploy.redis_server import RedisServer
from pdserve.deploy.router_thread import RoutedCluster, RouterThread
from pdserve.deploy.spec import ClusterSpec
from pdserve.protocol import WorkerRecord, WorkerRole
from pdserve.router.http import HttpConfig


@dataclass(frozen=True)
class Placement:
    """Where pools go: onto nodes carrying a custom resource (one unit per worker), else
    spread over nodes by a placement group, or kept on one node with `pack`."""

    prefill_resource: str | None = None
    decode_resource: str | None = None
    pack: bool = False

    def resource(self, role: WorkerRole) -> str | None:
        return self.prefill_resource if role is WorkerRole.PREFILL else self.decode_resource


class ClusterStartError(RuntimeError):
    """Which part of the cluster failed to start, and why."""


class RayCluster(RoutedCluster):
    def __init__(self, spec: ClusterSpec, placement: Placement = Placement(),
                 ray_address: str | None = None, redis_url: str | None = None,
                 address: str = "127.0.0.1:0", max_restarts: int = 3,
                 progress: bool = False, http: HttpConfig | None = None):
        self.spec = spec
        self._started_ray = False
        self._redis: RedisServer | None = None
        self._groups: list = []
        self.actors: dict[str, object] = {}
        self.nodes: dict[str, str] = {}  # worker id -> Ray node id
        self.pids: dict[str, int] = {}
        self.routers: list[RouterThread] = []
        try:
            self._start_ray(ray_address)
            # a local instance stays on loopback; a cluster needs this node's address
            self._host = "127.0.0.1" if self._started_ray and not ray_address else \
                ray.util.get_node_ip_address()
            spec = self.spec = replace(spec, router=replace(spec.router,
                                                            stream_host=self._host))
            # actors' KV receivers bind their node's address (deploy.ray_actors)
            nodes = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
            spec = self.spec = spec.secured(nodes | {self._host})
            self._step("Redis", lambda: self._start_redis(redis_url))
            self._step("workers", lambda: self._start_actors(placement, max_restarts,
                                                             progress))
            self._step("router", lambda: self.add_router(address, http))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _step(what: str, fn) -> None:
        try:
            fn()
        except ClusterStartError:
            raise
        except Exception as e:  # noqa: BLE001 - say which part failed
            raise ClusterStartError(f"starting the {what} failed: {e}") from e

    def _start_ray(self, ray_address: str | None) -> None:
        if ray.is_initialized():
            return
        # A local instance gets at least a CPU per worker thread: on a small machine the
        # workers share cores rather than wait for them.
        need = len(self.spec.roles()) * self.spec.threads_per_worker
        extra = {} if ray_address else {"num_cpus": max(os.cpu_count() or 1, need)}
        try:
            ray.init(address=ray_address, namespace=NAMESPACE, include_dashboard=False,
                     log_to_driver=False, configure_logging=False, **extra)
        except Exception as e:  # noqa: BLE001
            where = ray_address or "a local Ray instance"
            raise ClusterStartError(f"starting Ray ({where}) failed: {e}") from e
        self._started_ray = True

    def _start_redis(self, redis_url: str | None) -> None:
        if redis_url is None:  # workers on other nodes must reach it: bind the node's address
            self._redis = RedisServer(host=self._host)
        self.redis_url = redis_url or self._redis.url

    def _start_actors(self, placement: Placement, max_restarts: int, progress: bool) -> None:
        spec = self.spec.for_workers()
        roles = spec.roles()
        strategies = self._strategies(roles, placement)
        for worker_id, role in roles:
            options = dict(name=worker_id, namespace=NAMESPACE, max_restarts=max_restarts,
                           max_task_retries=0, max_concurrency=256,
                           num_cpus=spec.threads_per_worker, num_gpus=spec.gpus_per_worker,
                           **strategies[worker_id], **runtime_env())
            self.actors[worker_id] = WorkerActor.options(**options).remote(
                spec, worker_id, role, self.redis_url)
        refs = {worker_id: actor.ready.remote() for worker_id, actor in self.actors.items()}
        bar = tqdm(total=len(refs), desc="starting workers", file=sys.stderr,
                   disable=not progress)
        for worker_id, ref in refs.items():
            try:
                self.nodes[worker_id], self.pids[worker_id] = ray.get(ref)
            except Exception as e:  # noqa: BLE001
                raise ClusterStartError(f"worker {worker_id} failed to start: {e}") from e
            bar.update()
        bar.close()

    def _strategies(self, roles, placement: Placement) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for pool in WorkerRole:
            members = [w for w, r in roles if r is pool]
            if not members:
                continue
            resource = placement.resource(pool)
            if resource:
                for w in members:
                    out[w] = {"resources": {resource: 1}}
                continue
            bundles = [{"CPU": self.spec.threads_per_worker} for _ in members]
            group = placement_group(bundles, strategy="STRICT_PACK" if placement.pack
                                    else "SPREAD", name=f"pdserve-{pool.value}")
            self._groups.append(group)
            if not group.wait(timeout_seconds=60):
                raise ClusterStartError(f"no room for the {pool.value} pool "
                                        f"({len(members)} x {bundles[0]})")
            for i, w in enumerate(members):
                out[w] = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=i)}
        return out

    def connect(self, record: WorkerRecord):
        return handle_for(record, ray.get_actor(record.worker_id, namespace=NAMESPACE),
                          RayCalls(self.spec.worker_call_timeout_s))

    def close(self) -> None:
        self._close_routers()
        for actor in self.actors.values():
            try:
                ray.get(actor.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - dead already, or stuck: killed below
                pass
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        for group in self._groups:
            remove_placement_group(group)
        self._groups.clear()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
