"""The ``bitstorm`` command (issue 17): one console script whose subcommands are the jobs'
programs, each with a ``--help`` that gives its fields and examples; bitstorm's own log lines
reach the user under Ray, and Ray's per-report lines do not."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bitstorm.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"run": "trials_per_stratum", "train": "backbone", "tune": "grace_period"}


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_each_subcommand_has_help_with_examples(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: bitstorm {name}") and "examples:\n  bitstorm " in text
    assert "-v, --verbose" in text and "-q, --quiet" in text
    assert "``" not in text  # no reStructuredText leaks into a terminal
    if name in FIELDS:
        assert "fields (key=value" in text and FIELDS[name] in text


def test_the_console_script_is_installed_and_lists_the_subcommands():
    script = shutil.which("bitstorm") or str(Path(sys.executable).with_name("bitstorm"))
    done = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert all(f"  {name} " in done.stdout for name in SUBCOMMANDS)
    version = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("bitstorm ")


def test_bitstorm_lines_reach_the_user_under_ray(tmp_path):
    """A sequential campaign through Ray actors: its round status (INFO) and the pool's lines
    are printed; Ray set the root logger to ERROR, which must not silence them."""
    spec = {
        "name": "logs",
        "models": [{"name": "own", "factory": "tests.campaign.factories:small_net"}],
        "dataset": "digits",
        "images": 8,
        "image_selection": "any",
        "kinds": ["weight"],
        "layers": ["0"],
        "bits": [30],
        "sampling": {"margin": 0.3},
        "trials_per_stratum": 8,
        "max_rounds": 2,
        "output": str(tmp_path / "out"),
        "resources": {"actors": 1},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "bitstorm", "run", "--spec", str(tmp_path / "spec.yaml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting a private local Ray instance" in done.stderr
    assert "after round 0: own weight SDC" in done.stderr
    assert "actor 0 is ready on node" in done.stderr
    assert "Reporting training result" not in done.stderr + done.stdout
