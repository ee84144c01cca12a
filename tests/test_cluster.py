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
    assert workers and all("g5" in w["node_config"]["InstanceType"] or "p" in w["node_config"]["InstanceType"]
                           for w in workers)
    assert any("[cuda]" in cmd for cmd in config["setup_commands"]), "install the project with the cuda extra"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard is reached by port-forwarding only"
