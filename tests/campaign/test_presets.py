"""The paper presets (campaign/specs/paper/): each loads, follows the paper's protocol, compares a
linear-head baseline with a text-headed model, and names checkpoints that the training commands
in its header produce. No training here: the commands are parsed and checked as configs."""

import json
import shlex
from pathlib import Path

import pytest

from bitstorm.config import shipped_config
from bitstorm.errors import ConfigError
from campaign.cli import DEFAULT_OUTPUT, load_campaign_spec, main
from campaign.default import default_embeddings, default_train_configs
from campaign.spec import CampaignSpec, ModelEntry, load_spec
from trainers.checkpoint import FORMAT, MANIFEST, REQUIRED
from trainers.config import TrainConfig, load_train_config
from trainers.driver import built_embeddings_path
from trainers.heads import head_kind

PAPER = Path(__file__).resolve().parents[2] / "campaign" / "specs" / "paper"
PRESETS = sorted(PAPER.glob("*.yaml"))
ZOO = {
    "imagenet_resnet18",
    "imagenet_resnet50",
    "imagenet_mobilenet_v2",
    "imagenet_vgg16_bn",
    "imagenet_swin_v2_t",
    "cifar10_resnet50",
    "cifar100_resnet50",
    "digits_resnet18",
}

# Layers whose outputs have no image dimension (Swin-V2's position-bias tables) hold no neurons.
EXCLUDED = {"imagenet_swin_v2_t": ["*.cpb_mlp.*"]}


def header(path: Path) -> list[str]:
    """The leading comment of a preset, with ``\\``-continued lines joined."""
    lines, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        current += line.lstrip("#").strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        lines.append(current)
        current = ""
    return lines


def training_runs(path: Path) -> list[TrainConfig]:
    """The config of every ``python -m trainers.train`` command in the preset's header."""
    runs = []
    for line in header(path):
        if line.startswith("python -m trainers.train "):
            argv = shlex.split(line)
            assert argv[3] == "--config", line
            runs.append(load_train_config(argv[4], argv[5:]))  # refuses unknown fields
    return runs


def test_the_zoo_has_one_preset_per_row():
    assert {p.stem for p in PRESETS} == ZOO


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_follows_the_paper_protocol(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.kinds == ["neuron"]
    assert spec.layers == ["*"] and spec.exclude_layers == EXCLUDED.get(path.stem, [])
    assert spec.layer_types == "conv_linear"
    assert spec.formats == ["fp32"] and spec.bits is None  # bits uniform over fp32
    assert spec.protocol == "goldeneye" and spec.range_restriction is True
    assert spec.image_selection == "own_correct" and spec.overall == "layer_mean"
    assert spec.non_finite_sdc is False and spec.exhaustive_last_layer is True
    assert spec.dataset == path.stem.split("_")[0]
    if spec.dataset == "digits":  # this machine: local, CPU
        assert spec.resources.gpus_per_actor == 0 and not spec.output.startswith("s3://")
    else:  # a cluster: one GPU per actor, results to object storage
        assert spec.resources.gpus_per_actor == 1 and spec.output.startswith("s3://")


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_models_are_a_linear_baseline_and_a_text_head_from_the_header_commands(path):
    spec = load_spec(path)
    entries = {e.name.rpartition("_")[2]: e for e in spec.models}
    assert sorted(entries) == ["linear", "text"] and len(spec.models) == 2
    runs = {cfg.run_dir: cfg for cfg in training_runs(path)}
    assert len(runs) == 2, "the header gives one training command per model"
    for head, entry in entries.items():
        cfg = runs.get(str(Path(entry.checkpoint).resolve()))
        assert cfg is not None, f"{entry.checkpoint} is no run folder of the header's commands"
        assert cfg.head == head and entry.name == f"{cfg.backbone}_{head}"
        assert cfg.dataset == spec.dataset and Path(cfg.data_root) == Path(spec.data_root)
        if head_kind(cfg.head).needs_embeddings:
            trained_with = Path(cfg.embeddings) if cfg.embeddings else built_embeddings_path(cfg)
            assert entry.embeddings and Path(entry.embeddings).resolve() == trained_with.resolve()
        else:
            assert entry.embeddings is None
    assert len({cfg.backbone for cfg in runs.values()}) == 1  # the same backbone, two heads


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_found_by_the_name_its_header_gives(path):
    name = f"paper/{path.stem}"
    assert any(f"--spec {name}" in line for line in header(path))
    assert shipped_config(name, "specs", package="campaign").resolve() == path


def test_digits_preset_uses_what_the_default_run_writes():
    spec = load_spec(PAPER / "digits_resnet18.yaml")
    output = Path(DEFAULT_OUTPUT).resolve()
    configs = default_train_configs(output)
    entries = {e.name.rpartition("_")[2]: e for e in spec.models}
    assert {head: str(Path(e.checkpoint).resolve()) for head, e in entries.items()} == {
        head: cfg.run_dir for head, cfg in configs.items()
    }
    assert Path(entries["text"].embeddings).resolve() == default_embeddings(output)
    assert Path(configs["text"].embeddings) == default_embeddings(output)
    assert Path(spec.output).resolve().parent == output
    # The header's commands are the default's own runs.
    assert {cfg.run_dir for cfg in training_runs(PAPER / "digits_resnet18.yaml")} == {
        cfg.run_dir for cfg in configs.values()
    }


def _fake_checkpoint(folder: Path, epoch: int) -> None:
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(
        json.dumps({k: None for k in REQUIRED} | {"format": FORMAT, "epoch": epoch})
    )


def test_run_folders_in_a_spec_become_their_latest_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_checkpoint(tmp_path / "runs" / "a" / "checkpoint_1", 1)
    _fake_checkpoint(tmp_path / "runs" / "a" / "checkpoint_2", 2)
    _fake_checkpoint(tmp_path / "ckpt", 5)
    (tmp_path / "spec.yaml").write_text(
        "models:\n"
        "  - {name: a, checkpoint: runs/a}\n"
        "  - {name: b, checkpoint: ckpt, embeddings: e.safetensors}\n"
    )
    spec = load_campaign_spec("spec.yaml", ["images=8"])
    assert isinstance(spec, CampaignSpec) and spec.images == 8
    assert spec.models == [
        ModelEntry("a", str(Path("runs/a/checkpoint_2"))),
        ModelEntry("b", "ckpt", "e.safetensors"),
    ]
    (tmp_path / "spec.yaml").write_text("models: [{name: a, checkpoint: runs/none}]\n")
    with pytest.raises(ConfigError, match=r"models\[a\]\.checkpoint: runs/none: neither"):
        load_campaign_spec("spec.yaml", [])


def test_an_unknown_preset_name_lists_the_shipped_ones(capsys):
    assert main(["--spec", "paper/digits_resnet81"]) == 2
    err = capsys.readouterr().err
    assert "no config file 'paper/digits_resnet81'" in err
    assert all(f"paper/{name}" in err for name in ZOO)


def test_the_fault_model_example_runs_on_the_default_models_and_pairs_with_bit_flip():
    example = load_spec("examples/fault_models_digits", [])
    preset = load_spec("paper/digits_resnet18", [])
    assert example.fault_model == "multi_bit:2" and example.models == preset.models
    assert example.output == preset.output and example.dataset == "digits"
    paired = load_spec(
        "examples/fault_models_digits", ["fault_model=bit_flip", "name=digits_bit_flip"]
    )
    assert paired.bits_of("fp32") == [*example.bits_of("fp32"), 31]
    assert (
        CampaignSpec.measured(paired, {"resnet18_linear": "a", "resnet18_text": "b"}).get(
            "fault_model"
        )
        is None
    )  # bit_flip: the fingerprint of a campaign from before fault models
