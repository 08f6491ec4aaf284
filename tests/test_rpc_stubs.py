"""The checked-in stubs in rpc/ are what `make proto` generates from proto/ now."""

from __future__ import annotations

from pathlib import Path

from pdserve.rpc.codegen import GENERATED, OUT, generate


def test_checked_in_stubs_match_the_protos(tmp_path: Path):
    generate(tmp_path)
    stale = [name for name in GENERATED
             if (tmp_path / name).read_text() != (OUT / name).read_text()]
    assert not stale, f"rpc/{', rpc/'.join(stale)} are stale: run `make proto`"
