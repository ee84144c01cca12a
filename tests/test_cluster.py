"""clusters/gpu.yaml validates offline with Ray's own cluster-launcher validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_YAML = ROOT / "clusters" / "gpu.yaml"
# AWS instance families with NVIDIA GPUs
GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5")


def test_gpu_cluster_yaml_validates() -> None:
    # Private Ray API (ray 2.60): prepare_config fills defaults, validate_config checks the schema.
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(GPU_YAML.read_text())
    config = prepare_config(raw)
    validate_config(config)

    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs the driver only, no trials"
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    types = [w["node_config"]["InstanceType"] for w in workers]
    assert types and all(t.split(".")[0] in GPU_FAMILIES for t in types), types
    # what docs/sweeps.md says the file is: a CPU-only head and up to N autoscaled GPU workers of this type
    page = (ROOT / "docs" / "sweeps.md").read_text(encoding="utf-8")
    assert f"up to {config['max_workers']} autoscaled GPU workers (`{types[0]}`" in page
    assert any("[cuda]" in cmd for cmd in config["setup_commands"]), "install the project with the cuda extra"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard is reached by port-forwarding only"


def test_ssh_is_admitted_only_by_the_security_group_the_user_names(monkeypatch) -> None:
    """Ray's launcher gives a security group it creates itself an SSH rule for 0.0.0.0/0 (and only adds
    `provider.security_group.IpPermissions` to it), but leaves alone node types that name their
    `SecurityGroupIds`. So every node type names the one group the user creates, on one marked line."""
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    text = GPU_YAML.read_text()
    lines = text.splitlines()
    marked = [i for i, line in enumerate(lines) if ">>> SET" in line]
    assert len(marked) == 1 and "SecurityGroupIds: &cluster_security_group" in lines[marked[0] + 1]
    settings = yaml.safe_dump(yaml.safe_load(text))  # without the comments
    assert "0.0.0.0/0" not in settings and "IpPermissions" not in settings

    config = prepare_config(yaml.safe_load(text))
    groups = [n["node_config"].get("SecurityGroupIds") for n in config["available_node_types"].values()]
    assert groups[0] and all(g == groups[0] for g in groups), "every node type in the user's group"

    # The launcher's own step (private API, ray 2.60) run on this config: it creates no security group
    # (and so no 0.0.0.0/0 SSH rule) for it, and would for a node type that names none.
    created: list[list[str]] = []
    monkeypatch.setattr(
        aws_config, "_upsert_security_groups", lambda conf, types: created.append(types) or {}
    )
    assert aws_config._configure_security_group(config) is config and created == []
    del config["available_node_types"]["gpu_worker"]["node_config"]["SecurityGroupIds"]
    with pytest.raises(KeyError):  # the fake returns no group for it
        aws_config._configure_security_group(config)
    assert created == [["gpu_worker"]]
    ssh = [r for r in aws_config._create_default_inbound_rules([]) if r.get("FromPort") == 22]
    assert ssh and ssh[0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}], "what a created group would admit"
