"""The example cluster configs parse and give the prefill and decode groups the custom
resources that `pdserve serve --prefill-resource prefill --decode-resource decode` names."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"


def test_ray_up_config_marks_prefill_and_decode_nodes():
    cfg = yaml.safe_load((CONFIGS / "ray-cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert types["prefill"]["resources"] == {"prefill": 1}
    assert types["decode"]["resources"]["decode"] >= 1
    assert cfg["head_node_type"] in types
    assert "--prefill-resource prefill" in (CONFIGS / "ray-cluster.yaml").read_text()


def test_kuberay_manifest_marks_prefill_and_decode_groups():
    manifest = yaml.safe_load((CONFIGS / "kuberay.yaml").read_text())
    assert manifest["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in manifest["spec"]["workerGroupSpecs"]}
    for name in ("prefill", "decode"):
        resources = json.loads(json.loads(groups[name]["rayStartParams"]["resources"]))
        assert resources[name] >= 1


def test_kuberay_head_exposes_grpc_http_and_its_scrape_target():
    manifest = yaml.safe_load((CONFIGS / "kuberay.yaml").read_text())
    head = manifest["spec"]["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert ports["grpc"] == 50051 and ports["http"] == 8000
    assert head["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])
    scrape = yaml.safe_load((CONFIGS.parent / "prometheus.yml").read_text())
    assert any(t.endswith(":8000") for job in scrape["scrape_configs"]
               for static in job.get("static_configs", []) for t in static["targets"])


def test_both_configs_turn_rays_token_authentication_on():
    cfg = yaml.safe_load((CONFIGS / "ray-cluster.yaml").read_text())
    for command in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "ray start" not in command or command.startswith("RAY_AUTH_MODE=token ")
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert any("export RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"])  # drivers
    manifest = yaml.safe_load((CONFIGS / "kuberay.yaml").read_text())
    assert manifest["spec"]["authOptions"]["mode"] == "token"
