"""Engine speed against transformers on the same model, same prompts, same threads.

Measures, side by side in one run:
- prefill tokens/s for one 512-token prompt;
- decode tokens/s at batch 1 and batch 16 (128-token prompts, 64 new tokens each; decode
  time only, the prefill step excluded).
transformers runs `generate` (greedy, KV cache on); its decode time is
`generate(1 + N new tokens) - generate(1 new token)`.

    .venv/bin/python -m pdserve.bench.engine [--model smollm2-135m] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pdserve.engine import LLM, SamplingParams, resolve_model


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 40000, (n, length), generator=g).tolist()


def ours_prefill(llm: LLM, prompt: list[int], repeats: int) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0)
    llm.engine.block_manager.reset_prefix_cache()

    def run():
        llm.generate([prompt], params)
        llm.engine.block_manager.reset_prefix_cache()  # measure compute, not cache hits

    return _median_time(run, repeats)


def ours_decode(llm: LLM, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    """Seconds for `new_tokens - 1` decode steps of the whole batch (prefill excluded)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    times = []
    for r in range(repeats):
        ids = [f"d{r}-{i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts, strict=True):
            engine.add_request(rid, p, params)
        while any(engine.scheduler.requests[rid].num_output_tokens == 0 for rid in ids):
            engine.step()  # prefill (one or more chunked steps)
        t0 = time.perf_counter()
        while engine.has_work():
            engine.step()
        times.append(time.perf_counter() - t0)
        engine.block_manager.reset_prefix_cache()
    return statistics.median(times)


def hf_generate_time(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return _median_time(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    llm = LLM(str(path), enable_prefix_caching=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []

    prompt = _prompts(1, args.prefill_len, seed=0)
    t_ours = ours_prefill(llm, prompt[0], args.repeats)
    t_hf = hf_generate_time(hf, prompt, 1, args.repeats)
    rows.append((f"prefill tok/s ({args.prefill_len}-token prompt)",
                 args.prefill_len / t_ours, args.prefill_len / t_hf))

    n_dec = args.decode_tokens
    for batch in (1, 16):
        prompts = _prompts(batch, args.decode_prompt_len, seed=batch)
        t_ours = ours_decode(llm, prompts, n_dec, args.repeats)
        t_hf = (hf_generate_time(hf, prompts, n_dec, args.repeats)
                - hf_generate_time(hf, prompts, 1, args.repeats))
        tokens = batch * (n_dec - 1)
        rows.append((f"decode tok/s (batch {batch})", tokens / t_ours, tokens / t_hf))

    print(f"\nSmolLM2-135M fp32, CPU, torch threads = {torch.get_num_threads()}")
    print(f"{'metric':40} {'pdserve':>10} {'transformers':>13} {'ratio':>7}")
    for name, ours, ref in rows:
        print(f"{name:40} {ours:10.1f} {ref:13.1f} {ours / ref:6.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": args.model, "threads": torch.get_num_threads(),
            "results": [dict(metric=n, pdserve=o, transformers=r, ratio=o / r)
                        for n, o, r in rows],
        }, indent=2))


if __name__ == "__main__":
    main()
