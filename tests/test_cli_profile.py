"""`pdserve profile`: its help, the roofline path (no torch needed, a valid profile written),
the measuring path refused without the server extra, and (slow) the measuring path on a tiny
model with --quick, whose fit predicts its own points."""

from __future__ import annotations

import pytest
from cli_helpers import run_cli

from pdserve.deploy.cli import main
from pdserve.protocol.cost_profile import CostProfile

NO_TORCH = ("torch", "ray", "transformers", "zmq")


def test_help_says_what_it_measures_and_where_it_writes(tmp_path):
    r = run_cli(["profile", "--help"], tmp_path, block=NO_TORCH)
    assert r.returncode == 0, r.stderr
    for words in ("usage: pdserve profile", "bench/results/costmodel/profile_cpu.json",
                  "--gpu", "--model-size", "--tp", "--list-gpus", "--quick", "minutes"):
        assert words in r.stdout, words
    r = run_cli(["--help"], tmp_path, block=NO_TORCH)
    assert "profile" in r.stdout


def test_roofline_path_writes_a_valid_profile_without_torch(tmp_path):
    r = run_cli(["profile", "--gpu", "H100-SXM", "--model-size", "llama-3.1-8b", "--tp", "2"],
             tmp_path, block=NO_TORCH)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "bench/results/costmodel/profile_H100-SXM_llama-3.1-8b_tp2.json"
    profile = CostProfile.load(path)
    assert profile.source == "roofline" and profile.machine["tensor_parallel"] == 2
    assert str(path.relative_to(tmp_path)) in r.stdout


def test_list_gpus_names_every_table_entry_with_its_source(capsys):
    assert main(["profile", "--list-gpus"]) == 0
    out = capsys.readouterr().out
    for key in ("H100-SXM", "H200", "A100-SXM-80GB", "L40S", "llama-3.1-70b", "https://"):
        assert key in out


def test_measuring_without_the_extra_names_it(tmp_path):
    r = run_cli(["profile", "--quick"], tmp_path, block=("torch",))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "missing module: torch" in r.stderr


def test_bad_roofline_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["profile", "--gpu", "H100-SXM", "--out", str(tmp_path / "p.json")]) == 2
    assert "needs both --gpu and --model-size" in capsys.readouterr().err
    assert main(["profile", "--gpu", "TPU", "--model-size", "llama-3.1-8b",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "unknown GPU 'TPU'" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
def test_quick_measurement_fits_its_own_points(tiny_llama_dir, tmp_path, capsys):
    out, png = tmp_path / "profile.json", tmp_path / "profile.png"
    assert main(["profile", "--model", str(tiny_llama_dir), "--quick", "--skip-cluster",
                 "--repeats", "2", "--out", str(out), "--plot", str(png)]) == 0
    profile = CostProfile.load(out)
    assert profile.source == "measured" and profile.router_s == 0.0
    assert profile.kv_bytes_per_token == 2 * 3 * 2 * 16 * 4  # tiny: 3 layers, 2 KV heads x 16
    points = profile.sources["step_points"]
    assert {p[0] for p in points} == {"prefill", "decode", "mixed"}
    assert any(p[2] > p[1] * (p[1] + 1) // 2 for p in points)  # a chunk after an offset
    # a loose bound: timings on a shared machine are noisy, a broken fit is far off
    errors = sorted(abs(profile.step.step_s(t, pairs, ctx, seqs) / s - 1)
                    for _, t, pairs, ctx, s, seqs in points)
    assert errors[len(errors) // 2] < 1.0
    assert profile.transfer.bytes_per_s > 0 and len(profile.sources["transfer_points"]) > 0
    assert "--quick" in profile.sources["command"]
    assert png.stat().st_size > 0
    assert "step fit over" in capsys.readouterr().out
