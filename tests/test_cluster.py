"""clusters/gpu.yaml validates offline with Ray's own cluster-launcher validation."""

from __future__ import annotations

from pathlib import Path

import yaml

GPU_YAML = Path(__file__).resolve().parents[1] / "clusters" / "gpu.yaml"


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
    assert workers and all(
        "g5" in w["node_config"]["InstanceType"] or "p" in w["node_config"]["InstanceType"] for w in workers
    )
    assert any("[cuda]" in cmd for cmd in config["setup_commands"]), "install the project with the cuda extra"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard is reached by port-forwarding only"


def test_ssh_is_admitted_only_by_the_security_group_the_user_names() -> None:
    """Ray's launcher gives a security group it creates itself an SSH rule for 0.0.0.0/0 (and only adds
    `provider.security_group.IpPermissions` to it), but leaves alone node types that name their
    `SecurityGroupIds`. So every node type names the one group the user creates, on one marked line."""
    import importlib.util

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

    # The launcher behaviour this relies on (boto3 is not installed here, so read the source).
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    launcher = (ray_dir / "autoscaler" / "_private" / "aws" / "config.py").read_text()
    assert '"IpRanges": [{"CidrIp": "0.0.0.0/0"}]' in launcher
    assert 'if "SecurityGroupIds" not in node_type["node_config"]' in launcher
