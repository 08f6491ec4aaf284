"""What API keys and TLS on the client API cost: TTFT of the same requests through a
plaintext 1P1D deployment and through one with an API key and TLS, side by side in one
run.

Both deployments run at once (`pdserve serve --no-ray --pin-cores`, bench.server), but
requests go one at a time, alternating between them (the order flips every pair), so
exactly one deployment works at any moment and both see the same machine. The
certificates are made for the run (a CA and a server certificate for 127.0.0.1, with the
`cryptography` package). Reported: the median TTFT of each, the median of the pair ratios
(TLS / plain) and the pooled ratio (sum / sum).

    python -m pdserve.bench.client_tls --pairs 40 --json bench/results/client_tls.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from pdserve.bench.backends import PdServeBackend
from pdserve.bench.certs import make_pki
from pdserve.bench.server import DEPLOYMENTS, Server
from pdserve.bench.workload import random_dataset
from pdserve.rpc.credentials import Credentials

API_KEY = "sk-bench-client-tls"


def write_certificates(folder: Path) -> tuple[Path, Path, bytes]:
    """(server certificate, its key, the CA's PEM) for 127.0.0.1, written to `folder`."""
    pki = make_pki()
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(pki.server.cert)
    key_path.write_bytes(pki.server.key)
    return cert_path, key_path, pki.ca.cert


async def measure(plain_target: str, tls_target: str, ca: bytes, samples, pairs: int):
    # made on the loop that uses them: a gRPC aio channel belongs to one loop
    plain = PdServeBackend(plain_target, "always")
    secured = PdServeBackend(tls_target, "always", credentials=Credentials(API_KEY, ca))
    for backend in (plain, secured):  # warm-up, not measured
        for sample in samples[:2]:
            await backend.send(sample)
    rows = []
    for i in tqdm(range(pairs), desc="pairs", file=sys.stderr):
        sample = samples[2 + i]
        order = [("plain", plain), ("tls", secured)]
        if i % 2:
            order.reverse()
        row = {}
        for name, backend in order:
            result = await backend.send(sample)
            if not result.success:
                raise RuntimeError(f"{name} request failed: {result.code} {result.error}")
            row[name] = result.ttft
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.client_tls", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ports", type=int, nargs=2, default=[50093, 50094])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    samples = random_dataset(args.pairs + 2, args.input_len, args.output_len, seed=7)
    folder = Path(tempfile.mkdtemp(prefix="pdserve-bench-tls-"))
    cert, key, ca = write_certificates(folder)
    deployment = DEPLOYMENTS["1p1d"]
    plain_server = Server(deployment, args.model, args.ports[0], None, log_name="plain")
    try:
        tls_server = Server(deployment, args.model, args.ports[1], None, log_name="tls",
                            extra_args=("--api-key", API_KEY, "--tls-cert", str(cert),
                                        "--tls-key", str(key)))
        try:
            rows = asyncio.run(measure(plain_server.target, tls_server.target, ca, samples,
                                       args.pairs))
        finally:
            tls_server.stop()
    finally:
        plain_server.stop()
    ratios = [r["tls"] / r["plain"] for r in rows]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m pdserve.bench.client_tls " + " ".join(argv or sys.argv[1:]),
        "pairs": args.pairs, "input_len": args.input_len, "output_len": args.output_len,
        "median_ttft_ms": {k: 1000 * statistics.median(r[k] for r in rows)
                           for k in ("plain", "tls")},
        "median_pair_ratio": statistics.median(ratios),
        "pooled_ratio": sum(r["tls"] for r in rows) / sum(r["plain"] for r in rows),
        "rows": rows,
    }
    print(f"TTFT plain {result['median_ttft_ms']['plain']:.1f} ms, API key + TLS "
          f"{result['median_ttft_ms']['tls']:.1f} ms (medians); TLS / plain: median pair "
          f"{result['median_pair_ratio']:.3f}, pooled {result['pooled_ratio']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
