"""The `pdserve` command line: every command explains itself, client commands import no
server module, server-side ones name the missing extra, `pdserve bench` runs in-process."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bench_recorder import Recorder
from cli_helpers import run_cli

from pdserve.bench import serve_bench, sweep
from pdserve.bench.backends import Backend
from pdserve.deploy.cli import SERVER_MODULES, main


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "pdserve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for word in ("chat", "convert", "models", "disaggregated"):
        assert word in out


def test_models_lists_the_builtin(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_bad_model_is_a_clear_error(capsys, tmp_path):
    assert main(["chat", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["convert", "gpt-17"]) == 2
    assert "unknown built-in model 'gpt-17'" in capsys.readouterr().err


def test_logging_level_comes_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("PDSERVE_LOGGING_LEVEL", "loud")
    assert main(["models"]) == 2
    assert "PDSERVE_LOGGING_LEVEL='LOUD' is not a logging level" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_answers_with_the_builtin_model(capsys):
    assert main(["chat", "--max-tokens", "16", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_help_imports_neither_torch_nor_ray(tmp_path):
    code = ("import sys\n"
            "from pdserve.deploy.cli import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'ray', 'transformers') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert "COMMAND" in out and "HEAVY []" in out


@pytest.mark.parametrize("args", [
    ["serve"], ["chat", "hi"], ["convert"], ["models"],
    ["bench", "sweep", "--workload", "chat"],
])
def test_server_commands_without_the_extra_name_it(tmp_path, args):
    r = run_cli(args, tmp_path, block=("torch",))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "missing module: torch" in r.stderr
    assert "pip install 'pdserve[server]'" in r.stderr


def test_client_commands_need_no_server_module(tmp_path):
    blocked = ("torch", "ray", "transformers", "zmq", "redis")
    for args in (["--help"], ["generate", "--help"], ["status", "--help"], ["bench", "--help"],
                 ["bench", "sweep", "--help"]):
        r = run_cli(args, tmp_path, block=blocked)
        assert r.returncode == 0 and "usage: pdserve" in r.stdout, (args, r.stderr)
    r = run_cli(["serve"], tmp_path, block=("ray", "zmq"))
    assert r.returncode == 1 and "missing modules: zmq, ray" in r.stderr


def test_server_modules_are_the_server_extra():
    """SERVER_MODULES lists the import names of exactly the `server` extra's distributions."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["server"]
    wanted = {_dist_name(r) for r in extra}
    provided: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            provided.setdefault(_dist_name(dist), set()).add(module)
    for dist in wanted:
        assert provided.get(dist, set()) & set(SERVER_MODULES), f"{dist} has no module listed"
    for module in SERVER_MODULES:
        assert any(module in provided.get(dist, ()) for dist in wanted), module


def _dist_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def test_bench_runs_in_process_with_paths_relative_to_the_caller(monkeypatch, tmp_path):
    recorder = Recorder()  # seen only if the benchmark runs in this process
    monkeypatch.setattr(serve_bench, "make_backend", lambda _args: recorder)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--backend", "openai", "--dataset", "mooncake", "--num-prompts", "4",
                 "--length-scale", "0.005", "--time-scale", "1e-5",
                 "--json", "out/result.json"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["dataset"] == "mooncake" and result["completed"] == 4
    assert len(recorder.sent) == 5  # one warm-up, four measured


def test_bench_sweep_runs_in_process_with_paths_relative_to_the_caller(monkeypatch, tmp_path):
    started = []

    class FakeServer:
        def __init__(self, deployment, *args, extra_args=()):
            self.deployment = deployment
            started.append((deployment.name, extra_args))

        def backend(self) -> Backend:
            return Recorder()

        def stop(self) -> None:
            pass

    monkeypatch.setattr(sweep, "Server", FakeServer)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "sweep", "--workload", "chat", "--deployments", "1p1d", "--rates",
                 "1e6", "--seeds", "0", "--num-prompts", "3", "--out", "res",
                 "--serve-args", "--log-requests --api-key 'a b'"]) == 0
    result = json.loads((tmp_path / "res" / "chat.json").read_text())
    assert [r["deployment"] for r in result["runs"]] == ["1p1d"]
    run = result["runs"][0]  # random prompts: no prefix shared; nothing disaggregated here
    assert run["prompt_tokens"] > 0 and run["shared_prefix_tokens"] == 0
    assert run["disagg_full_kv_bytes"] == 0 and result["kv_bytes_per_token"] == 46_080
    # the SLO's calibration server runs as it is; the measured ones take the flags
    assert started == [("2colo", ()), ("1p1d", ("--log-requests", "--api-key", "a b"))]


def test_bench_sweep_with_a_given_slo_starts_no_calibration_server(monkeypatch, tmp_path):
    started = []

    class FakeServer:
        def __init__(self, deployment, *args, extra_args=()):
            self.deployment = deployment
            started.append(deployment.name)

        def backend(self, slo=None) -> Backend:
            return Recorder()

        def stop(self) -> None:
            pass

    monkeypatch.setattr(sweep, "Server", FakeServer)
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "sweep", "--workload", "chat", "--deployments", "adaptive", "--rates",
            "1e6", "--seeds", "0", "--num-prompts", "3", "--out", "res", "--send-slo"]
    with pytest.raises(SystemExit):  # one without the other is an error, not a half-SLO
        main([*argv, "--slo-ttft-ms", "5000"])
    assert main([*argv, "--slo-ttft-ms", "5000", "--slo-tpot-ms", "300"]) == 0
    result = json.loads((tmp_path / "res" / "chat.json").read_text())
    assert started == ["adaptive"]
    assert result["slo"] == {"ttft_ms": 5000.0, "tpot_ms": 300.0}
    assert result["calibration"] is None
    from pdserve.bench.report import report
    assert "SLO given: TTFT **5000 ms**, TPOT **300.0 ms**" in report(
        {"chat": result}, tmp_path, "")


def test_serve_security_flags_parse_into_what_the_cluster_uses(tmp_path):
    """`--curve` names the data plane's mode; key files and TLS flags become the router's
    ApiSecurity (digests only); a lone certificate is refused before anything starts."""
    from pdserve.deploy.cli import build_parser
    from pdserve.deploy.security_flags import api_security
    from pdserve.deploy.spec import ClusterSpec, CurveMode

    keys = tmp_path / "keys.txt"
    keys.write_text("# ops\nsk-one\nsk-two\n")
    args = build_parser().parse_args(["serve", "--curve", "on", "--api-key-file", str(keys)])
    spec = ClusterSpec(curve=CurveMode(args.curve)).secured({"127.0.0.1"})
    assert spec.curve_keys is not None  # on even on loopback
    assert ClusterSpec(curve=CurveMode("off")).secured({"10.0.0.1"}).curve_keys is None
    security = api_security(args)
    assert security.accepts("Bearer sk-two") and not security.accepts("Bearer sk-three")
    assert "sk-one" not in repr(security)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--curve", "sometimes"])
    lone = build_parser().parse_args(["serve", "--tls-cert", str(keys)])
    with pytest.raises(ValueError, match="certificate and its private key"):
        api_security(lone)


def test_the_sweep_report_describes_a_trace_and_the_kv_its_disaggregated_prompts_sent(
        tmp_path):
    from pdserve.bench.report import report

    here = Path(__file__).resolve().parents[1] / "bench/results/adaptive/mooncake_tail"
    sweep = json.loads((here / "nocache/mooncake.json").read_text())
    text = report({"mooncake": sweep}, tmp_path, "")
    assert "The mooncake trace's last requests, lengths x0.05" in text
    assert "Poisson" not in text
    row = next(line for line in text.splitlines() if line.startswith("| pdserve 1P1D | 0.2"))
    assert row.endswith("| 14.0 | 100% (24%) |")  # prefix caching off: every block sent
    older = json.loads((here / "cached/mooncake.json").read_text())  # before "shared"
    row = next(line for line in report({"mooncake": older}, tmp_path, "").splitlines()
               if line.startswith("| pdserve 1P1D | 0.2"))
    assert row.endswith("| 15.5 | 73% |")
