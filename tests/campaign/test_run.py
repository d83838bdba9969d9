"""The entry point as a user calls it: a script run from the repository root."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from campaign.analysis.results import open_results
from campaign.cli import main
from campaign.runner import run_campaign
from tests.campaign.runs import tiny_settings, tiny_spec

ROOT = Path(__file__).resolve().parents[2]


def _help(script, cwd) -> str:
    """``script --help`` run as a user runs it; its stdout."""
    done = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=cwd, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_help_runs_as_a_script():
    assert "--list-sites MODEL" in _help("campaign/run.py", ROOT)


def test_the_script_alone_runs_from_another_folder(tmp_path):
    """What ``ray submit`` does: it copies only campaign/run.py to the head node and runs it
    there, so the script must import the installed package, not its neighbours."""
    alone = tmp_path / "run.py"
    alone.write_text((ROOT / "campaign" / "run.py").read_text())
    (tmp_path / "campaign").mkdir()  # a neighbour that would shadow the package
    (tmp_path / "campaign" / "__init__.py").write_text("raise SystemExit('neighbour imported')\n")
    assert "--list-sites MODEL" in _help(alone, tmp_path)


def test_list_sites_prints_the_table(capsys):
    assert (
        main(
            [
                "--list-sites",
                "resnet18",
                "--input",
                "3,32,32",
                "--num-classes",
                "10",
                "--format",
                "int8",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["layer", "type"] and len(lines) == 23
    assert lines[-1].split()[-2:] == ["89,376,256", "405,584"]  # 8 bits x the elements


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--list-sites", "resnt18"], "did you mean resnet18"),
        (["--list-sites", "resnet18", "--input", "3,x,32"], "positive sizes"),
        (["--list-sites", "resnet18", "--types", "Conv3d"], "Conv2d"),
        (["--dry-run"], "--dry-run plans a --spec campaign"),
    ],
)
def test_bad_arguments_exit_2_with_a_fix(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_dry_run_prints_the_trials_a_run_records_and_writes_nothing(
    checkpoints, tmp_path, capsys
):
    output = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_settings(checkpoints, output)))
    assert main(["--spec", str(spec_file), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed
    assert not output.exists()  # nothing written, no Ray started
    per_kind = {
        (line.split()[0], line.split()[1]): int(line.split()[3].replace(",", ""))
        for line in printed.splitlines()[2:]
        if line.split()[0] in ("base", "text")
    }
    run_campaign(tiny_spec(checkpoints, output), progress=False, local=True)
    recorded = open_results(output / "test").df(
        "select model, kind, count(*) as n from trials group by all"
    )
    assert per_kind == {(r.model, r.kind): r.n for r in recorded.itertuples()}
    assert f"{sum(per_kind.values()):,}" in printed.splitlines()[-1]
