"""`pdserve serve`: a whole cluster on this machine, until Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from pdserve.deploy.input_flags import add_input_limit_flags, input_limits
from pdserve.deploy.security_flags import add_security_flags, api_security, exposure_refusal
from pdserve.deploy.trace_flags import add_trace_flags, apply_trace_flags


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model: router (gRPC), prefill and decode workers",
                       description="Start Redis (embedded unless --redis-url), the workers as "
                                   "Ray actors (a local Ray instance unless --ray-address) and "
                                   "the router's gRPC server; print the address when ready; "
                                   "stop everything on Ctrl-C, SIGTERM or SIGHUP.")
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in model name or local HF folder (default: %(default)s)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (%(default)s)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (%(default)s)")
    p.add_argument("--colocated", type=int, default=0,
                   help="colocated workers, prefill and decode in one (%(default)s)")
    p.add_argument("--adaptive", type=int, default=0, metavar="N",
                   help="workers whose role the cluster's controller sets as the load asks: "
                        "each drains (finishes its jobs, takes no new ones) and switches "
                        "between prefill, decode and colocated without a restart. One starts "
                        "colocated, more start half prefill, half decode; combines with the "
                        "pools above (%(default)s)")
    p.add_argument("--adaptive-dwell", type=float, default=30.0, metavar="SECONDS",
                   help="an adaptive worker keeps a role at least this long; the controller "
                        "moves one worker at a time, and at most one per third of this "
                        "(%(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="gRPC bind address (%(default)s)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port, 0 picks one")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API and /metrics on --host; 0 picks one "
                        "(%(default)s)")
    p.add_argument("--no-http", action="store_true", help="serve gRPC only")
    p.add_argument("--served-model-name", default=None,
                   help="the `model` HTTP clients name (default: --model)")
    p.add_argument("--transport", choices=["zmq", "torch"], default="zmq",
                   help="KV transfer: zmq (TCP) or torch (gloo on CPU, NCCL on GPU)")
    p.add_argument("--curve", choices=["auto", "on", "off"], default="auto",
                   help="authenticate and encrypt the data plane (KV transfer, token stream) "
                        "with keys made for this cluster; auto: whenever it binds beyond "
                        "loopback (%(default)s)")
    p.add_argument("--redis-url", default=None,
                   help="an external Redis (default: start the embedded one)")
    p.add_argument("--num-blocks", type=int, default=512, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="reuse the KV of prompt prefixes a worker already holds: prefill "
                        "computes only what it lacks, and a decode worker is sent only the "
                        "blocks it lacks (default: on)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per engine step: the chunked-prefill budget")
    p.add_argument("--prefill-pack-tokens", type=int, default=None, metavar="N",
                   help="a prefill worker's step takes more prompts only up to N tokens in "
                        "all: short prompts share a step, a long one runs alone, so no "
                        "prompt's first token waits for the prompts packed beside it "
                        "(default: 256 on a CPU, whose step costs the sum of its tokens; "
                        "the whole --max-num-batched-tokens on a GPU)")
    p.add_argument("--disaggregation-threshold", type=int, default=128,
                   help="prompts shorter than this prefill on the decode worker under the "
                        "`auto` hint (%(default)s tokens)")
    p.add_argument("--cost-profile", default=None, metavar="JSON",
                   help="a cost profile from `pdserve profile` (this machine) or `pdserve "
                        "profile --gpu` (a GPU's roofline): the router then places each "
                        "request (prefilled on a prefill worker or where it decodes, and on "
                        "which workers) by predicted TTFT and TPOT against its SLOs, and "
                        "refuses at once one whose predicted first token is past its TTFT "
                        "SLO (--disaggregation-threshold is then unused)")
    p.add_argument("--default-ttft-slo", type=float, default=30.0, metavar="SECONDS",
                   help="admission: refuse at once (RESOURCE_EXHAUSTED) a request whose first "
                        "token the prefill work already queued would delay past its TTFT SLO; "
                        "this is the SLO of requests that set none; 0 turns it off "
                        "(%(default)s)")
    p.add_argument("--kv-lease", type=float, default=10.0, metavar="SECONDS",
                   help="a decode reservation ends after this long with no KV and no "
                        "keep-alive from its prefill worker; time in the prefill queue does "
                        "not count. A prefill job whose decode side failed keeps its KV "
                        "this long for a re-send to another decode worker (%(default)s)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="dispatches of a request whose worker fails it before its first "
                        "token, the first included (%(default)s)")
    p.add_argument("--migration-limit", type=int, default=3,
                   help="times a request whose worker fails it after tokens streamed moves "
                        "to another worker, the stream going on; 0 fails it (%(default)s)")
    p.add_argument("--worker-call-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="a router call to a worker (reserve, submit, generate, abort) with no "
                        "answer in this time finds the worker gone: the request fails with "
                        "UNAVAILABLE and the worker leaves the router's view until its "
                        "heartbeat comes again (%(default)s)")
    p.add_argument("--heartbeat-ttl", type=float, default=3.0, metavar="SECONDS",
                   help="a worker whose heartbeat stops (dead or hung) leaves the routers' "
                        "views after this long, and the requests it holds fail with "
                        "UNAVAILABLE; it rejoins when its heartbeat comes again "
                        "(%(default)s)")
    p.add_argument("--router-stream-grace", type=float, default=5.0, metavar="SECONDS",
                   help="a worker ends the jobs of a router whose token stream has been "
                        "unreachable this long (the router died), freeing their blocks "
                        "(%(default)s)")
    p.add_argument("--threads-per-worker", type=int, default=1,
                   help="torch threads (and Ray CPUs) per worker (%(default)s)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs each worker actor asks Ray for (%(default)s; 1 on GPU nodes)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto, or HOST:6379); default: start a "
                        "local Ray instance")
    p.add_argument("--prefill-resource", default=None,
                   help="custom Ray resource that marks prefill nodes (one unit per worker)")
    p.add_argument("--decode-resource", default=None,
                   help="custom Ray resource that marks decode nodes (one unit per worker)")
    p.add_argument("--pack", action="store_true",
                   help="keep each pool on one node (default: spread over nodes)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="restarts of a worker whose process died or whose engine loop "
                        "broke; past it the worker stays down (%(default)s)")
    p.add_argument("--restart-window", type=float, default=600.0, metavar="SECONDS",
                   help="with --no-ray: --max-restarts counts the restarts within this "
                        "window (Ray counts them over the actor's life) (%(default)s)")
    p.add_argument("--no-ray", action="store_true",
                   help="plain local processes instead of Ray (one machine only)")
    p.add_argument("--pin-cores", action="store_true",
                   help="with --no-ray: one core per worker")
    add_input_limit_flags(p)
    add_security_flags(p)
    add_trace_flags(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from pdserve.deploy.local_cluster import LocalCluster
    from pdserve.deploy.redis_server import public_url
    from pdserve.deploy.spec import ClusterSpec, CurveMode
    from pdserve.deploy.supervisor import RestartPolicy
    from pdserve.kvtransfer.transports import TransportKind
    from pdserve.protocol import CostProfile
    from pdserve.router.controller import ControllerConfig
    from pdserve.router.http import HttpConfig
    from pdserve.router.router import RouterConfig

    try:
        security = api_security(args)
    except (OSError, ValueError) as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        return 2
    if (why := exposure_refusal(args.host, security, args.insecure)) is not None:
        print(f"pdserve serve: refusing to start: {why}", file=sys.stderr)
        return 2
    try:
        profile = CostProfile.load(args.cost_profile) if args.cost_profile else None
    except ValueError as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        return 2
    controller = None if args.adaptive <= 0 else ControllerConfig(
        dwell_s=args.adaptive_dwell, cooldown_s=args.adaptive_dwell / 3)
    spec = ClusterSpec(model=args.model, prefill=args.prefill, decode=args.decode,
                       colocated=args.colocated, adaptive=args.adaptive,
                       block_size=args.block_size,
                       num_blocks=args.num_blocks,
                       enable_prefix_caching=args.enable_prefix_caching,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       prefill_pack_tokens=args.prefill_pack_tokens,
                       transport=TransportKind(args.transport), curve=CurveMode(args.curve),
                       threads_per_worker=args.threads_per_worker, pin_cores=args.pin_cores,
                       gpus_per_worker=args.gpus_per_worker,
                       worker_call_timeout_s=args.worker_call_timeout,
                       heartbeat_ttl_s=args.heartbeat_ttl,
                       router_stream_grace_s=args.router_stream_grace,
                       router=RouterConfig(
                           disaggregation_threshold=args.disaggregation_threshold,
                           cost_profile=profile,
                           default_ttft_slo_s=args.default_ttft_slo,
                           lease_s=args.kv_lease,
                           max_attempts=args.max_attempts,
                           migration_limit=args.migration_limit,
                           input_limits=input_limits(args), security=security,
                           controller=controller,
                           **apply_trace_flags(args)))
    stop = threading.Event()
    n = args.prefill + args.decode + args.colocated + args.adaptive
    where = "local processes" if args.no_ray else f"Ray ({args.ray_address or 'local'})"
    print(f"pdserve: starting Redis, {n} workers ({args.prefill} prefill, {args.decode} "
          f"decode, {args.colocated} colocated, {args.adaptive} adaptive) on {where}, and "
          "the router...", file=sys.stderr)
    t0 = time.monotonic()
    address = f"{args.host}:{args.port}"
    http = None if args.no_http else HttpConfig(args.host, args.http_port,
                                                args.served_model_name or args.model)
    if args.no_ray:
        restarts = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window)
        cluster = LocalCluster(spec, redis_url=args.redis_url, address=address,
                               restarts=restarts, http=http)
    else:
        from pdserve.deploy.ray_cluster import ClusterStartError, Placement, RayCluster

        placement = Placement(args.prefill_resource, args.decode_resource, args.pack)
        try:
            cluster = RayCluster(spec, placement, ray_address=args.ray_address,
                                 redis_url=args.redis_url, address=address,
                                 max_restarts=args.max_restarts, progress=True, http=http)
        except ClusterStartError as e:
            print(f"pdserve serve: {e}", file=sys.stderr)
            return 1
    # after the start: Ray installs its own handlers while it starts
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        served = "" if http is None else f", HTTP on http://{cluster.http_address}"
        print(f"pdserve: ready in {time.monotonic() - t0:.1f}s; gRPC on {cluster.address}"
              f"{served} (Redis {public_url(cluster.redis_url)})", file=sys.stderr)
        print(cluster.address, flush=True)  # stdout: the gRPC address, then the HTTP URL
        if http is not None:
            print(f"http://{cluster.http_address}", flush=True)
        stop.wait()
        print("pdserve: shutting down", file=sys.stderr)
    finally:
        cluster.close()
    return 0
