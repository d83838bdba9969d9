"""cluster.yaml is a real Ray autoscaler config: it passes Ray's own schema validation."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema violation
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert {t["node_config"]["InstanceType"] for t in types.values()} >= {
        "g5.xlarge",
        "p4d.24xlarge",
    }
    assert any("pip install -e" in command for command in config["setup_commands"])


def test_shipped_specs_load():
    from campaign.spec import load_spec

    paths = sorted((ROOT / "campaign" / "specs").rglob("*.yaml"))
    assert paths
    for path in paths:
        spec = load_spec(path)
        assert spec.models and spec.output
