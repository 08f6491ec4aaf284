"""Log output of pdserve's own processes (the CLI, local worker processes, Ray worker
actors): `PDSERVE_LOGGING_LEVEL` (DEBUG, INFO, WARNING, ...), as vLLM's
VLLM_LOGGING_LEVEL. Unset, Python's default stands: warnings and errors to stderr. The
variable reaches local worker processes through their environment and Ray actors through
their runtime environment (`runtime_env`)."""

from __future__ import annotations

import logging
import os

ENV = "PDSERVE_LOGGING_LEVEL"
FORMAT = "%(levelname)s %(asctime)s %(process)d %(name)s: %(message)s"


def configure_logging() -> None:
    """Send this process's logs at the level `PDSERVE_LOGGING_LEVEL` names to stderr."""
    level = os.environ.get(ENV, "").strip().upper()
    if not level:
        return
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"{ENV}={level!r} is not a logging level (DEBUG, INFO, WARNING, "
                         "ERROR, CRITICAL)")
    logging.basicConfig(level=level, format=FORMAT)


def runtime_env() -> dict:
    """What a Ray actor needs to log as this process does."""
    level = os.environ.get(ENV)
    return {"runtime_env": {"env_vars": {ENV: level}}} if level else {}
