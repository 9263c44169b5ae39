"""``ray_cluster.yaml`` against the cluster-config schema that Ray ships, and against what the engine needs of it."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.conftest import REPO

SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_is_valid_against_rays_own_schema(cluster_config):
    jsonschema.validate(cluster_config, json.loads(SCHEMA.read_text()))


def test_the_schema_check_catches_a_broken_config(cluster_config):
    """The check above would fail on a config Ray refuses: a misspelt key, a node type without its config."""
    schema = json.loads(SCHEMA.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cluster_config, "max_worker": 8}, schema)
    broken = {**cluster_config, "available_node_types": {**cluster_config["available_node_types"], "gpu_worker": {"max_workers": 2}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_the_head_takes_no_units_and_cpu_and_gpu_workers_autoscale(cluster_config):
    types = cluster_config["available_node_types"]
    assert types[cluster_config["head_node_type"]]["resources"] == {"CPU": 0}, "the head plans and commits only"
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"] <= cluster_config["max_workers"]
    assert sum(types[n]["max_workers"] for n in ("cpu_worker", "gpu_worker")) <= cluster_config["max_workers"]
    assert any("pip install" in command and "sam3-engine" in command for command in cluster_config["setup_commands"])
