"""cluster.yaml and cluster.local.yaml are real Ray autoscaler configs (they pass Ray's own schema
validation) whose nodes run a Python bitstorm supports, and cluster.yaml mounts the shared file
system the paper presets read."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("cluster.yaml", "cluster.local.yaml")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_start_ray_commands")
    return [command for key in keys for command in config.get(key, [])]


def required_python() -> tuple[int, int]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    major, minor = re.fullmatch(r">=(\d+)\.(\d+)", pyproject["project"]["requires-python"]).groups()
    return int(major), int(minor)


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_configs_pass_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(name)))  # raises on any schema violation


def test_cluster_yaml_has_a_cpu_head_and_gpu_workers():
    config = load("cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert {t["node_config"]["InstanceType"] for t in types.values()} >= {
        "g5.xlarge",
        "p4d.24xlarge",
    }
    assert any("pip install -e" in command for command in config["setup_commands"])


def test_cluster_yaml_runs_a_ray_image_of_a_supported_python_and_this_ray():
    import ray

    image = load("cluster.yaml")["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu", image)
    assert match, f"{image}: not a Ray GPU image tagged with its Python"
    assert match[1] == ray.__version__
    assert (int(match[2]), int(match[3])) >= required_python()


def fake_python(folder: Path, version: str | None) -> dict[str, str]:
    """A PATH whose ``python`` is this interpreter, or one that reports ``version``."""
    folder.mkdir()
    python = folder / "python"
    if version is None:
        python.symlink_to(sys.executable)
    else:  # runs `python -c CODE` with sys.version_info and sys.version of ``version``
        info = tuple(map(int, version.split(".")))
        pretend = f"import sys; sys.version_info = {info}; sys.version = '{version}'"
        python.write_text(
            f'#!/bin/sh\nexec {sys.executable} -c "{pretend}; exec(sys.argv.pop(1))" "$2"\n'
        )
        python.chmod(0o755)
    return {"PATH": f"{folder}:/usr/bin:/bin"}


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_first_checks_the_nodes_python_the_one_every_command_runs(name, tmp_path):
    """The first setup command refuses a Python older than pyproject's requires-python, run here
    as a node runs it (no container: ``python`` on PATH is the interpreter it checks)."""
    config = load(name)
    check = config["setup_commands"][0]
    bound = re.search(r"sys\.version_info < \((\d+), (\d+)\)", check)
    assert bound and tuple(map(int, bound.groups())) == required_python()
    ok = subprocess.run(["bash", "-c", check], env=fake_python(tmp_path / "now", None))
    assert ok.returncode == 0
    old = subprocess.run(
        ["bash", "-c", check],
        env=fake_python(tmp_path / "old", "3.10.12"),
        capture_output=True,
        text=True,
    )
    assert old.returncode == 1 and "bitstorm needs Python >= 3.11, not 3.10.12" in old.stderr
    # `ray submit` runs `python`: no command may install with or start another interpreter.
    assert not [c for c in commands(config) if re.search(r"\bpython3|(?<!-m )\bpip3?\s", c)]


def test_every_cluster_preset_reads_the_file_system_cluster_yaml_mounts():
    from campaign.spec import load_spec

    config = load("cluster.yaml")
    mount = re.search(
        r"mount -t nfs4 .* (/\S+)$", "\n".join(config["initialization_commands"]), re.M
    )
    assert mount, "cluster.yaml mounts no NFS (EFS) file system"
    shared = mount[1]
    assert f"--volume={shared}:{shared}" in config["docker"]["run_options"]  # the container sees it
    on_cluster = 0
    for path in sorted((ROOT / "campaign" / "specs" / "paper").glob("*.yaml")):
        spec = load_spec(path)
        reads = [spec.data_root] + [
            p for m in spec.models for p in (m.checkpoint, m.embeddings) if p
        ]
        if not any(Path(p).is_absolute() for p in reads):
            assert not Path(spec.output).is_absolute(), f"{path.name}: a local preset"
            continue  # a preset for this machine, relative to the folder it runs in
        on_cluster += 1
        outside = [p for p in reads if not p.startswith(shared + "/")]
        assert not outside, f"{path.name} reads {outside}, outside {shared}"
        assert spec.output.startswith(("s3://", shared + "/")), f"{path.name}: {spec.output}"
    assert on_cluster >= 7


def test_shipped_specs_load():
    from campaign.spec import load_spec

    paths = sorted((ROOT / "campaign" / "specs").rglob("*.yaml"))
    assert paths
    for path in paths:
        spec = load_spec(path)
        assert spec.models and spec.output
