"""The offline-throughput bench (bench.offline), on the built-in model, runs each system,
keeps every run's time and reports the best, and checks the transformers baselines' greedy
tokens against pdserve's."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.offline import main

pytestmark = pytest.mark.slow


def test_runs_are_kept_and_the_best_is_reported(tmp_path, capsys):
    out = tmp_path / "offline.json"
    result = main(["--num-requests", "3", "--input-len", "8",
                   "--output-len", "4", "--hf-requests", "2", "--runs", "2",
                   "--json", str(out)])
    assert json.loads(out.read_text()) == result
    rows = result["results"]
    assert set(rows) == {"pdserve", "transformers batch 1", "transformers batch 16"}
    ours = rows["pdserve"]
    assert len(ours["runs_elapsed_s"]) == 2 and ours["elapsed_s"] == min(ours["runs_elapsed_s"])
    # from the best run's time, which the JSON keeps rounded to 10 ms
    best = ours["elapsed_s"]
    low, high = 3 * 4 / (best + 0.005) - 0.01, 3 * 4 / (best - 0.005) + 0.01
    assert low <= ours["output_throughput"] <= high
    for name in ("transformers batch 1", "transformers batch 16"):
        assert rows[name]["num_requests"] == 2 and len(rows[name]["runs_elapsed_s"]) == 1
        assert rows[name]["greedy_match"] == 2
    assert "best of 2 run(s)" in capsys.readouterr().out


def test_bad_counts_are_refused():
    with pytest.raises(SystemExit):
        main(["--runs", "0"])
