"""The README's main job (`make serve`): start `pdserve serve` with 1 prefill + 1 decode
worker on the built-in model, send one request through `pdserve generate`, shut down.

    .venv/bin/python -m pdserve.deploy.demo [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

CLI = [sys.executable, "-m", "pdserve"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    args = ap.parse_args()
    # --disaggregation-threshold 1: even a short chat message takes the 1P1D path
    server = subprocess.Popen([*CLI, "serve", "--model", args.model, "--prefill", "1",
                               "--decode", "1", "--port", "0",
                               "--disaggregation-threshold", "1"],
                              stdout=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().strip()
        if not address:
            print("pdserve serve did not start (see the messages above)", file=sys.stderr)
            return 1
        print(f"$ pdserve generate --target {address} --chat {args.prompt!r}", file=sys.stderr)
        return subprocess.run([*CLI, "generate", "--target", address, "--chat",
                               "--max-tokens", "64", args.prompt]).returncode
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
