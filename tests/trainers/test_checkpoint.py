"""Checkpoints round-trip exactly and refuse tampered or mismatched files."""

import json

import pytest
import torch

from bitstorm.errors import DataError
from trainers.checkpoint import (
    FORMAT,
    MANIFEST,
    REQUIRED,
    TRAIN_STATE,
    WEIGHTS,
    load_checkpoint,
    load_train_state,
    load_weights,
    read_manifest,
    resolve_checkpoint,
    save_checkpoint,
)
from trainers.config import TrainConfig
from trainers.models import build_model

HISTORY = [{"epoch": 1, "val_top1": 0.5}]


def _save(tmp_path, head="linear", backbone="tiny_cnn", rows=None):
    cfg = TrainConfig(
        backbone=backbone,
        head=head,
        dataset="synthetic",
        embeddings="e.safetensors" if rows is not None else None,
    )
    model = build_model(backbone, head, 10, rows, embedding_dim=cfg.embedding_dim, seed=3)
    with torch.no_grad():  # move away from the initialisation, so a rebuild cannot match by luck
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = save_checkpoint(
        tmp_path / "ckpt",
        model,
        cfg,
        class_names=tuple("abcdefghij"),
        epoch=1,
        history=HISTORY,
        descriptions_sha256="d" * 64 if rows is not None else None,
        embeddings_file_sha256="f" * 64 if rows is not None else None,
        train_state={"step": torch.tensor(4)},
    )
    return model.eval(), folder


@pytest.mark.parametrize("head", ["linear", "text", "text_frozen", "text_orthogonal"])
def test_round_trip_gives_the_same_logits(tmp_path, head):
    rows = torch.randn(10, 12) if head in ("text", "text_frozen") else None
    model, folder = _save(tmp_path, head=head, rows=rows)
    loaded, cfg = load_checkpoint(folder)
    images = torch.randn(5, 3, 32, 32)
    assert torch.equal(loaded(images), model(images))
    assert cfg.head == head and not loaded.training
    manifest = read_manifest(folder)
    assert manifest["history"] == HISTORY and "embeddings_sha256" not in manifest
    trained_from_file = rows is not None
    assert manifest["descriptions_sha256"] == ("d" * 64 if trained_from_file else None)
    assert manifest["embeddings_file_sha256"] == ("f" * 64 if trained_from_file else None)
    assert manifest["embedding_dim"] == (
        None if head == "linear" else (12 if rows is not None else 512)
    )
    assert int(load_train_state(folder)["step"]) == 4
    weights = load_weights(folder)  # what resuming loads: the checked model.safetensors
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_tampered_weights_are_refused(tmp_path):
    _, folder = _save(tmp_path)
    raw = bytearray((folder / WEIGHTS).read_bytes())
    raw[-1] ^= 0x01  # one flipped bit in the last weight
    (folder / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256 does not match"):
        load_checkpoint(folder)
    with pytest.raises(DataError, match="sha256 does not match"):
        load_weights(folder)  # resuming reads the weights through the same check


def test_mismatched_architecture_is_refused(tmp_path):
    _, folder = _save(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["config"]["backbone"] = "resnet18"  # the weights are tiny_cnn's
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="weights do not fit resnet18"):
        load_checkpoint(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(DataError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    _, folder = _save(tmp_path)
    (folder / WEIGHTS).unlink()
    with pytest.raises(DataError, match=r"has no model\.safetensors"):
        load_checkpoint(folder)


def test_train_state_is_never_unpickled_freely(tmp_path):
    _, folder = _save(tmp_path)

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Payload()}, folder / TRAIN_STATE)
    with pytest.raises(Exception, match=r"Weights only load failed"):
        load_train_state(folder)


def test_a_run_folder_resolves_to_its_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for folder, epoch in (("checkpoint_b", 1), ("checkpoint_a", 3), ("checkpoint_c", 2)):
        (run / folder).mkdir(parents=True)
        (run / folder / MANIFEST).write_text(
            json.dumps({k: None for k in REQUIRED} | {"format": FORMAT, "epoch": epoch})
        )
    assert resolve_checkpoint(run) == run / "checkpoint_a"  # the highest epoch, not the name
    assert resolve_checkpoint(run / "checkpoint_b") == run / "checkpoint_b"  # already one
    with pytest.raises(DataError, match=r"neither a checkpoint .* nor a training run folder"):
        resolve_checkpoint(tmp_path / "empty")
