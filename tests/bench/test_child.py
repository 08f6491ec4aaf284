"""A bench's helper process (bench.child): answers over its pipe, and one that dies
before answering ends the wait with an error naming its exit code, not a read that
never returns (the parent used to keep the pipe's child end open)."""

from __future__ import annotations

import os
import time

import pytest

from pdserve.bench.child import Child, ChildDied


def _echo(conn, prefix: str) -> None:
    while (msg := conn.recv()) is not None:
        conn.send(prefix + msg)


def _dies(conn, code: int) -> None:
    os._exit(code)


def test_a_child_answers_until_told_to_stop():
    child = Child(_echo, "re: ")
    assert child.ask("one") == "re: one"
    assert child.ask("two") == "re: two"
    child.stop()
    assert child.process.exitcode == 0


def test_a_child_that_dies_before_answering_is_an_error_at_once():
    child = Child(_dies, 3)
    started = time.monotonic()
    with pytest.raises(ChildDied, match="code 3"):
        child.recv()
    assert time.monotonic() - started < 30
    child.stop()  # nothing to tell it: still ends cleanly
