"""C++ kernels for decode on CPU (`csrc/`), compiled once per machine.

- `paged_decode_attention`: decode attention through torch ops must first gather every
  sequence's KV out of the paged cache into a padded tensor, then read it again; at batch
  32-64 that copy costs more than the attention itself. The kernel reads K and V in place
  through the block table instead.
- `small_gemm`: a linear layer for decode's 1-64 rows on the plain weight, streamed once
  per call and register-blocked across rows (engine.model.cpu_linear).
- `rms_norm`, `fused_add_rms_norm`, `silu_and_mul`, `rotary_embedding`
  (`csrc/elementwise.cpp`): one pass per row where torch runs a chain of ops, each reading
  and writing the whole activation (engine.model.ops picks them).
Figures in bench/README.md.

The module is built with torch's C++ extension loader into
`$PDSERVE_CACHE_DIR/kernels/<cpu capability>/` the first time an engine starts on a
machine (about 30 s; needs a C++ compiler and ninja). When the build fails the engine keeps
the torch-ops path, which gives the same results.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pdserve.models import cache_dir

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / n for n in ("cpu_kernels.cpp", "decode_attention.cpp", "small_gemm.cpp",
                                "elementwise.cpp")]
_ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx2", "-mfma", "-mavx512f"]}
# a build takes about 30 s (minutes on a loaded machine): a lock older than this was left
# by a build that was killed midway
STALE_LOCK_S = 900.0


def clear_stale_lock(build_dir: Path, now: float | None = None) -> bool:
    """torch's loader waits without end for the `lock` file of a build in progress, and a
    build killed midway leaves it behind, so every later engine start would hang: remove a
    lock older than any build. True when one was removed."""
    lock = build_dir / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= STALE_LOCK_S:
        return False
    lock.unlink(missing_ok=True)
    log.warning("removed a stale kernel build lock (%.0f s old): %s", age, lock)
    return True


@functools.cache
def cpu_kernels() -> Any | None:
    """The compiled module, or None if it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load
    except ImportError:
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    build_dir = cache_dir() / "kernels" / capability.lower()
    build_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(build_dir)
    flags = ["-O3", "-fopenmp", "-ffast-math", *_ISA_FLAGS.get(capability, [])]
    if not any(build_dir.glob("*.so")):
        print("pdserve: compiling the CPU decode kernels (once per machine)...",
              file=sys.stderr)
    try:
        return load("pdserve_cpu_kernels", [str(p) for p in SOURCES], extra_cflags=flags,
                    extra_include_paths=[str(CSRC)],
                    extra_ldflags=["-fopenmp"], build_directory=str(build_dir))
    except Exception as e:  # compiler or ninja missing, build error
        log.warning("CPU decode kernels unavailable (%s); using torch ops", e)
        return None
