"""`pdserve generate` and `pdserve status`: the gRPC API from the terminal (rpc.client).

Every command is bounded in time: a router that does not answer ends it with the gRPC
status (DEADLINE_EXCEEDED, UNAVAILABLE) on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import grpc

from pdserve.rpc.client import PdServeClient
from pdserve.rpc.credentials import add_credential_flags, credentials_from_args


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream an answer from a running pdserve server",
                       description="Send PROMPT to the server's Generate RPC and stream the "
                                   "text to stdout; the finish reason, usage and timing "
                                   "breakdown go to stderr.")
    p.add_argument("prompt")
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT (%(default)s)")
    add_credential_flags(p)
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user chat message (the model's chat template)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (%(default)s)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--disaggregation", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.set_defaults(func=cmd_generate)


def add_status(sub) -> None:
    p = sub.add_parser("status", help="workers, nodes, load and KV use of a running server")
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT (%(default)s)")
    add_credential_flags(p)
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the router (%(default)s)")
    p.add_argument("--stale-after", type=float, default=5.0,
                   help="flag heartbeats older than this many seconds (%(default)s)")
    p.set_defaults(func=cmd_status)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt

    async def run() -> int:
        async with _client(args) as client:
            final = None
            async for piece in client.generate(
                    prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                    disaggregation=args.disaggregation, timeout=args.timeout):
                if piece.final is not None:
                    final = piece.final
                else:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            t, u = final.timing, final.usage
            where = (f"prefill {final.prefill_worker} -> decode {final.decode_worker}"
                     if final.disaggregated else f"local on {final.decode_worker}")
            reason = {1: "stop", 2: "length"}.get(final.finish_reason, "?")
            print(f"[{reason}; {u.prompt_tokens} prompt + {u.completion_tokens} tokens; "
                  f"{where}; TTFT {t.first_token_ms:.0f} ms (queue {t.router_queue_ms:.0f}, "
                  f"prefill {t.prefill_compute_ms:.0f}, KV {t.kv_transfer_ms:.1f}), "
                  f"decode {t.decode_ms:.0f} ms]", file=sys.stderr)
            return 0

    return _rpc(run)


def cmd_status(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            status = await client.cluster_status(timeout=args.timeout)
        now = time.time()
        print(f"router {status.router_id}: {len(status.workers)} workers")
        print(f"{'worker':14} {'role':10} {'state':9} {'node':16} {'running':>7} "
              f"{'waiting':>7} {'queued pf':>9} {'in flight':>9} {'leases':>6} {'KV used':>8} "
              f"{'beat age':>9}")
        for w in status.workers:
            # an adaptive worker's role is marked: the controller may change it
            role = f"{w.role}*" if w.adaptive else w.role
            print(f"{w.worker_id:14} {role:10} {w.state or 'serving':9} {w.node[:16]:16} "
                  f"{w.running:>7} {w.waiting:>7} {w.queued_prefill_tokens:>9} "
                  f"{w.in_flight:>9} {w.leases:>6} {100 * w.kv_usage:>7.1f}% "
                  f"{now - w.last_heartbeat:>8.1f}s")
        if any(w.adaptive for w in status.workers):
            _print_switches(status, now)
        # The router answers from its last view of the registry; when every heartbeat it
        # holds is old, that view is stale (most likely it cannot read Redis).
        ages = [now - w.last_heartbeat for w in status.workers]
        if ages and min(ages) > args.stale_after:
            print(f"warning: the newest heartbeat is {min(ages):.0f} s old: the router "
                  "cannot read the registry (Redis) and serves on its last view",
                  file=sys.stderr)
        return 0

    return _rpc(run)


def _print_switches(status, now: float) -> None:
    """The adaptive workers' controller and the role switches it ordered, newest first."""
    holder = (f"{status.controller} (epoch {status.controller_epoch})" if status.controller
              else "none elected yet")
    print(f"* adaptive: roles set by the controller, held by {holder}")
    print(f"role switches: {len(status.role_switches)}")
    for e in status.role_switches:
        print(f"  {now - e.time:>7.1f}s ago  {e.worker_id:14} {e.from_role:>9} -> "
              f"{e.to_role:9} {e.reason}")


def _client(args: argparse.Namespace) -> PdServeClient:
    return PdServeClient.with_credentials(args.target, credentials_from_args(args))


def _rpc(run) -> int:
    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as e:
        print(f"\npdserve: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # the credential flags
        print(f"pdserve: {e}", file=sys.stderr)
        return 2
