"""A checkpoint names the class-embedding file its text head was trained with, by the file's own
sha256 and by its descriptions' hash, and ``verify_embeddings`` accepts that file and no other:
not even one built from the same descriptions with another encoder."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from bitstorm.errors import DataError
from embeddings.store import ClassEmbeddings, load_embeddings, save_embeddings
from trainers.checkpoint import (
    MANIFEST,
    file_sha256,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    verify_embeddings,
)
from trainers.config import TrainConfig
from trainers.data import dataset_class_names
from trainers.loop import run_training
from trainers.models import build_model

CLASSES = tuple(dataset_class_names("synthetic"))
DESCRIPTIONS_HASH = hashlib.sha256(b"the descriptions").hexdigest()


def _embeddings(seed: int, *, encoder: str = "encoder-a", dim: int = 8) -> ClassEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.nn.functional.normalize(torch.randn(len(CLASSES), dim, generator=generator), dim=1)
    return ClassEmbeddings(
        embeddings=rows,
        class_names=CLASSES,
        encoder=encoder,
        pretrained="none",
        random_init=False,
        description_source="test",
        description_hash=DESCRIPTIONS_HASH,
        created_at="2026-01-01T00:00:00+00:00",
    )


class _Session:
    """The loop's session, in this process; it copies each reported checkpoint to ``keep`` (the
    loop deletes its own folder once it has reported)."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self, keep: Path) -> None:
        self.keep, self.reports = keep, 0

    def prepare_model(self, model):
        return model

    def report(self, metrics, checkpoint):
        self.reports += 1
        self.keep.mkdir(exist_ok=True)
        for item in Path(checkpoint).iterdir():
            (self.keep / item.name).write_bytes(item.read_bytes())

    def restore(self, load):
        return 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of the real training loop with a text head from an embedding file: the file,
    the manifest exactly as the loop wrote it, and a copy of the checkpoint folder."""
    folder = tmp_path_factory.mktemp("trained")
    path = save_embeddings(_embeddings(0), folder / "train.safetensors")
    cfg = TrainConfig(
        backbone="tiny_cnn",
        head="text",
        embeddings=str(path),
        dataset="synthetic",
        synthetic_size=60,
        epochs=1,
        batch_size=16,
        schedule="constant",
    )
    session = _Session(folder / "ckpt")
    run_training(cfg, session)
    assert session.reports == 1
    return path, json.loads((session.keep / MANIFEST).read_text()), session.keep


def test_the_loop_records_the_files_hash_and_the_descriptions_hash(trained):
    path, written, _ = trained
    assert written["embeddings_file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert written["embeddings_file_sha256"] == file_sha256(path)
    assert written["descriptions_sha256"] == DESCRIPTIONS_HASH
    assert "embeddings_sha256" not in written  # the old, misleading name is no longer written


def test_the_training_file_is_accepted(trained):
    path, _, checkpoint = trained
    manifest = read_manifest(checkpoint)
    loaded = verify_embeddings(manifest, path)
    assert torch.equal(loaded.embeddings, load_embeddings(path).embeddings)
    assert loaded.class_names == CLASSES


def test_same_descriptions_other_vectors_are_refused(trained, tmp_path):
    path, _, checkpoint = trained
    manifest = read_manifest(checkpoint)
    other_encoder = save_embeddings(_embeddings(1, encoder="encoder-b"), tmp_path / "b.safetensors")
    original = load_embeddings(path)
    nudged = torch.nn.functional.normalize(original.embeddings + 1e-3, dim=1)
    perturbed = save_embeddings(
        dataclasses.replace(original, embeddings=nudged), tmp_path / "nudged.safetensors"
    )
    for candidate in (other_encoder, perturbed):
        # The descriptions match, which is all the old check compared.
        assert load_embeddings(candidate).description_hash == manifest["descriptions_sha256"]
        with pytest.raises(DataError, match=r"not the embedding file .* same descriptions"):
            verify_embeddings(manifest, candidate)
    with pytest.raises(DataError, match=r"encoder-b"):
        verify_embeddings(manifest, other_encoder)


def test_other_descriptions_and_other_classes_are_refused(trained, tmp_path):
    path, _, checkpoint = trained
    manifest = read_manifest(checkpoint)
    other = dataclasses.replace(load_embeddings(path), description_hash="e" * 64)
    with pytest.raises(DataError, match=r"not the embedding file .* other descriptions"):
        verify_embeddings(manifest, save_embeddings(other, tmp_path / "other.safetensors"))
    renamed = {**manifest, "class_names": ["x", *CLASSES[1:]]}
    with pytest.raises(DataError, match=r"class 0 is 'class0' but the data set's class 0 is 'x'"):
        verify_embeddings(renamed, path)
    with pytest.raises(DataError, match="no such embedding file"):
        verify_embeddings(manifest, tmp_path / "missing.safetensors")


def test_a_head_trained_without_a_file_accepts_none(tmp_path):
    cfg = TrainConfig(backbone="tiny_cnn", head="text_random", dataset="synthetic")
    model = build_model("tiny_cnn", "text_random", 10, embedding_dim=8, seed=1)
    folder = save_checkpoint(
        tmp_path / "ckpt", model, cfg, class_names=CLASSES, epoch=1, history=[]
    )
    raw = json.loads((folder / MANIFEST).read_text())
    assert raw["descriptions_sha256"] is None and raw["embeddings_file_sha256"] is None
    path = save_embeddings(_embeddings(0), tmp_path / "e.safetensors")
    with pytest.raises(DataError, match=r"trained without one .*'text_random'"):
        verify_embeddings(read_manifest(folder), path)


def _as_old_manifest(checkpoint: Path, target: Path) -> Path:
    """A copy of ``checkpoint`` whose manifest is as checkpoints were written before the rename:
    ``embeddings_sha256`` held the descriptions' hash, and the file's hash was not recorded."""
    target.mkdir()
    for item in checkpoint.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["embeddings_sha256"] = manifest.pop("descriptions_sha256")
    del manifest["embeddings_file_sha256"]
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


def test_an_old_manifest_still_loads(trained, tmp_path):
    _, _, checkpoint = trained
    old = _as_old_manifest(checkpoint, tmp_path / "old")
    manifest = read_manifest(old)
    assert manifest["descriptions_sha256"] == DESCRIPTIONS_HASH  # read under its real name
    assert manifest["embeddings_file_sha256"] is None  # unknown
    assert "embeddings_sha256" not in manifest
    model, cfg = load_checkpoint(old)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(images), load_checkpoint(checkpoint)[0](images))
    assert cfg.head == "text"


def test_an_old_manifest_falls_back_to_the_descriptions(trained, tmp_path):
    path, _, checkpoint = trained
    old = _as_old_manifest(checkpoint, tmp_path / "old")
    assert torch.equal(
        verify_embeddings(read_manifest(old), path).embeddings, load_embeddings(path).embeddings
    )
    other = dataclasses.replace(load_embeddings(path), description_hash="e" * 64)
    with pytest.raises(DataError, match=r"not the embedding file .* other descriptions"):
        verify_embeddings(read_manifest(old), save_embeddings(other, tmp_path / "o.safetensors"))
    # A manifest dict read some other way (not through read_manifest) is understood too.
    raw = json.loads((old / MANIFEST).read_text())
    assert verify_embeddings(raw, path).description_hash == DESCRIPTIONS_HASH
    # The limit of the old record: without the file's hash, another encoder's file of the same
    # descriptions cannot be told apart.
    same_descriptions = save_embeddings(
        _embeddings(1, encoder="encoder-b"), tmp_path / "b.safetensors"
    )
    assert verify_embeddings(raw, same_descriptions).encoder == "encoder-b"
