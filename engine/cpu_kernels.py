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
`$PDSERVE_CACHE_DIR/kernels/<cpu capability>/` by `pdserve convert` (`make model`), or
else the first time an engine starts on a machine (about 30 s, minutes on a loaded
machine or a single pinned core; needs a C++ compiler and ninja), and again when the
sources or the torch install change. The build compiles a copy of the sources kept in
the cache, so checkouts of the same sources in other folders, with one virtual
environment, share one build (the compiler's command line names the source folder and
torch's headers, and a new command line rebuilds everything). A worker process waits
for a build in progress beyond its start timeout (deploy.local, `build_in_progress`).
When the build fails the engine keeps the torch-ops path, which gives the same results.
"""

from __future__ import annotations

import functools
import logging
import os
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


def clear_stale_lock(folder: Path, now: float | None = None) -> bool:
    """torch's loader waits without end for the `lock` file of a build in progress, and a
    build killed midway leaves it behind, so every later engine start would hang: remove a
    lock older than any build. True when one was removed."""
    lock = folder / "lock"
    age = _lock_age(folder, now)
    if age is None or age <= STALE_LOCK_S:
        return False
    lock.unlink(missing_ok=True)
    log.warning("removed a stale kernel build lock (%.0f s old): %s", age, lock)
    return True


def build_dir() -> Path:
    """Where this machine's build lives (per CPU capability: one cache may be shared by
    machines of several kinds)."""
    return cache_dir() / "kernels" / torch.backends.cpu.get_cpu_capability().lower()


def build_in_progress(now: float | None = None) -> bool:
    """Whether a process is compiling the kernels into this machine's cache right now (its
    lock is there and younger than any build)."""
    age = _lock_age(build_dir(), now)
    return age is not None and age <= STALE_LOCK_S


def _lock_age(folder: Path, now: float | None) -> float | None:
    """Seconds since the build lock in `folder` was made; None when there is none."""
    try:
        return (time.time() if now is None else now) - (folder / "lock").stat().st_mtime
    except FileNotFoundError:
        return None


@functools.cache
def cpu_kernels() -> Any | None:
    """The compiled module, or None if it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load
    except ImportError:
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(folder)
    flags = ["-O3", "-fopenmp", "-ffast-math", *_ISA_FLAGS.get(capability, [])]
    if not any(folder.glob("*.so")):
        print("pdserve: compiling the CPU decode kernels (once per machine)...",
              file=sys.stderr)
    try:
        src = _sources_copy(folder / "src")
        return load("pdserve_cpu_kernels", [str(src / p.name) for p in SOURCES],
                    extra_cflags=flags, extra_include_paths=[str(src)],
                    extra_ldflags=["-fopenmp"], build_directory=str(folder))
    except Exception as e:  # compiler or ninja missing, build error
        log.warning("CPU decode kernels unavailable (%s); using torch ops", e)
        return None


def _sources_copy(folder: Path) -> Path:
    """`folder` holding the sources as they are in this checkout. A file is rewritten only
    when its content differs (the build compares times), through a rename, so a process
    compiling the copy meanwhile never reads half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in CSRC.iterdir():
        if path.suffix not in (".cpp", ".h"):
            continue
        data, dest = path.read_bytes(), folder / path.name
        if not dest.is_file() or dest.read_bytes() != data:
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
    return folder
