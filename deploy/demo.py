"""The README's main job (`make serve`): start `pdserve serve` with 1 prefill + 1 decode
worker on the built-in model, send one request through `pdserve generate` (gRPC) and one
through the OpenAI-compatible HTTP API, shut down.

    .venv/bin/python -m pdserve.deploy.demo [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import urllib.request

CLI = [sys.executable, "-m", "pdserve"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    args = ap.parse_args()
    # --disaggregation-threshold 1: even a short chat message takes the 1P1D path
    server = subprocess.Popen([*CLI, "serve", "--model", args.model, "--prefill", "1",
                               "--decode", "1", "--port", "0", "--http-port", "0",
                               "--disaggregation-threshold", "1"],
                              stdout=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().strip()
        url = server.stdout.readline().strip()
        if not address or not url:
            print("pdserve serve did not start (see the messages above)", file=sys.stderr)
            return 1
        print(f"$ pdserve generate --target {address} --chat {args.prompt!r}", file=sys.stderr)
        code = subprocess.run([*CLI, "generate", "--target", address, "--chat",
                               "--max-tokens", "64", args.prompt]).returncode
        return code or chat_over_http(url, args.model, args.prompt)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def chat_over_http(url: str, model: str, prompt: str) -> int:
    """The same question through /v1/chat/completions, as curl would send it."""
    body = {"model": model, "max_tokens": 64,
            "messages": [{"role": "user", "content": prompt}]}
    data = json.dumps(body)
    print(f"$ curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{data}'", file=sys.stderr)
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=data.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.load(response)
    print(reply["choices"][0]["message"]["content"])
    timing = reply["pdserve"]["timing"]
    print(f"usage {reply['usage']}; TTFT {timing['first_token_ms']:.0f} ms "
          f"(prefill {timing['prefill_compute_ms']:.0f} ms, KV transfer "
          f"{timing['kv_transfer_ms']:.0f} ms)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
