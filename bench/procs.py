"""The processes of a local deployment, read from /proc (Linux; no psutil needed): the tree
under the `pdserve serve` process, the resident memory of each, and a name for each.

`pdserve serve --no-ray` runs the router (and the workers' heartbeats) in its own process,
each worker in a spawned child, and the embedded redis-server as another child. A worker
that receives KV (decode, colocated) is named by the KV port it listens on, which the
router reports (`kv_endpoint`); a worker that does not (prefill) by elimination when only
one such worker and one unnamed worker process remain.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")


def rss_bytes(pid: int) -> int | None:
    """Resident memory (VmRSS) of `pid`; None when it is gone (or is a zombie)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(comm, parent pid) of `pid`, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may itself hold spaces or parentheses
    comm = text[text.index("(") + 1:text.rindex(")")]
    return comm, int(text[text.rindex(")") + 2:].split()[1])


def descendants(root: int) -> list[int]:
    """Every live process under `root` (children, their children, ...), sorted."""
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents.setdefault(stat[1], []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return sorted(out)


def cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def listening_ports(pid: int) -> set[int]:
    """TCP ports `pid` listens on (its sockets' inodes matched in its network namespace)."""
    inodes = set()
    try:
        fds = list((PROC / str(pid) / "fd").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return set()
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:  # closed since listed (the listing's own descriptor, for one)
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (PROC / str(pid) / "net" / table).read_text().splitlines()[1:]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def endpoint_port(endpoint: str) -> int | None:
    """The port of a `tcp://host:port` endpoint; None for anything else."""
    if not endpoint.startswith("tcp://"):
        return None
    tail = endpoint.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def name_processes(root: int, workers: Iterable[tuple[str, str, str]]) -> dict[int, str]:
    """A name for `root` ("router") and each live process under it: a worker's id, "redis",
    "resource-tracker" (multiprocessing's), else "<comm>-<pid>". `workers` are (worker id,
    role, kv_endpoint) as the router reports them."""
    workers = list(workers)
    by_port = {p: wid for wid, _, ep in workers if (p := endpoint_port(ep)) is not None}
    names = {root: "router"}
    unnamed = []
    for pid in descendants(root):
        stat = _stat(pid)
        if stat is None:
            continue
        comm, cmd = stat[0], cmdline(pid)
        if comm.startswith("redis-server") or "redis-server" in cmd:
            names[pid] = "redis"
        elif "resource_tracker" in cmd:
            names[pid] = "resource-tracker"
        elif (hit := listening_ports(pid) & by_port.keys()):
            names[pid] = by_port[min(hit)]
        elif "spawn_main" in cmd:
            unnamed.append(pid)
        else:
            names[pid] = f"{comm}-{pid}"
    left = [wid for wid, _, _ in workers if wid not in names.values()]
    for pid in unnamed:
        names[pid] = left[0] if len(left) == 1 == len(unnamed) else f"worker-{pid}"
    return names


def rss_of(names: dict[int, str]) -> dict[str, int]:
    """Resident bytes per name, for the processes still alive."""
    return {name: rss for pid, name in names.items() if (rss := rss_bytes(pid)) is not None}
