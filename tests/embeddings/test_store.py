"""The embedding file's loader refuses what is wrong, and imports the paper's release safely."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from bitstorm.errors import DataError
from embeddings.classes import class_names
from embeddings.cli import main
from embeddings.store import (
    METADATA_KEY,
    ClassEmbeddings,
    import_release,
    load_embeddings,
    save_embeddings,
)

from .conftest import shared_file


def _embeddings(rows: int = 3, dim: int = 4) -> ClassEmbeddings:
    tensor = torch.nn.functional.normalize(torch.randn(rows, dim), dim=1)
    return ClassEmbeddings(
        embeddings=tensor,
        class_names=tuple(f"c{i}" for i in range(rows)),
        encoder="test",
        pretrained="none",
        random_init=False,
        description_source="test",
        description_hash="0" * 64,
        created_at="2026-01-01T00:00:00+00:00",
    )


def _write_raw(path, tensor, metadata):
    save_file({"embeddings": tensor}, str(path), {METADATA_KEY: json.dumps(metadata)})


def test_round_trip(tmp_path):
    original = _embeddings()
    save_embeddings(original, tmp_path / "e.safetensors")
    loaded = load_embeddings(tmp_path / "e.safetensors", ["c0", "c1", "c2"])
    assert torch.equal(loaded.embeddings, original.embeddings)
    assert loaded.metadata() == original.metadata()


def test_class_mismatch_is_refused(tmp_path):
    save_embeddings(_embeddings(), tmp_path / "e.safetensors")
    with pytest.raises(DataError, match="has 3 classes but the data set has 10"):
        load_embeddings(tmp_path / "e.safetensors", class_names("cifar10"))
    with pytest.raises(DataError, match="class 1 is 'c1' but the data set's class 1 is 'dog'"):
        load_embeddings(tmp_path / "e.safetensors", ["c0", "dog", "c2"])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), "NaN or Inf"),
        (lambda t: t * 2, "unit L2 norm; row 0 has norm 2.0000"),
        (lambda t: t[:2], "2 embedding rows for 3 class names"),
        (lambda t: t.double(), "float32"),
    ],
)
def test_invalid_tensors_are_refused(tmp_path, mutate, match):
    good = _embeddings()
    _write_raw(tmp_path / "bad.safetensors", mutate(good.embeddings).contiguous(), good.metadata())
    with pytest.raises(DataError, match=match):
        load_embeddings(tmp_path / "bad.safetensors")


def test_saving_refuses_invalid_embeddings_and_writes_nothing(tmp_path):
    good = _embeddings()
    bad = dataclasses.replace(good, embeddings=good.embeddings * 3)
    with pytest.raises(DataError, match="unit L2 norm"):
        save_embeddings(bad, tmp_path / "e.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_not_an_embedding_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="not a safetensors"):
        load_embeddings(tmp_path / "junk.safetensors")
    save_file({"weights": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(DataError, match="not a bitstorm class-embedding file"):
        load_embeddings(tmp_path / "model.safetensors")
    with pytest.raises(DataError, match="no such"):
        load_embeddings(tmp_path / "absent.safetensors")


class Payload:
    """Stands for a malicious object: unpickling it would run code of its choosing."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_release_import_never_unpickles_objects(tmp_path, capsys):
    torch.save(Payload(), tmp_path / "evil.pth")
    with pytest.raises(DataError, match="never unpickled"):
        import_release(tmp_path / "evil.pth", ["a"])
    assert "unpickled!" not in capsys.readouterr().out
    torch.save({"features": torch.ones(2, 3)}, tmp_path / "dict.pth")
    with pytest.raises(DataError, match="found dict"):
        import_release(tmp_path / "dict.pth", ["a", "b"])
    torch.save(torch.ones(2, 3), tmp_path / "ok.pth")
    with pytest.raises(DataError, match="2 embedding rows for 3 class names"):
        import_release(tmp_path / "ok.pth", ["a", "b", "c"])


def test_the_papers_released_imagenet_embeddings(tmp_path):
    names = class_names("imagenet")
    gpt3 = import_release(shared_file("seed-release/gpt3.pth"), names)
    photo = import_release(shared_file("seed-release/a-photo-of-a.pth"), names)
    raw = torch.load(shared_file("seed-release/a-photo-of-a.pth"), weights_only=True)
    assert raw.norm(dim=1).min() > 5  # the template release is not normalised; the import is
    for result in (gpt3, photo):
        assert result.embeddings.shape == (1000, 512)
        torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(1000))
    # Both encode the same classes in the same space: each class's description embedding is
    # closer to its own template embedding than to the average other class's.
    cross = gpt3.embeddings @ photo.embeddings.T
    own = cross.diagonal()
    others = (cross.sum(dim=1) - own) / 999
    assert (own > others).float().mean() > 0.99
    assert int(cross.argmax(dim=1).eq(torch.arange(1000)).sum()) >= 990  # 996 measured
    save_embeddings(gpt3, tmp_path / "gpt3.safetensors")
    assert (
        load_embeddings(tmp_path / "gpt3.safetensors", names).description_source
        == "release:gpt3.pth"
    )


def test_cli_import(tmp_path):
    torch.save(torch.randn(10, 8) * 5, tmp_path / "release.pth")
    out = tmp_path / "imported.safetensors"
    assert (
        main(["import", str(tmp_path / "release.pth"), "--classes", "cifar10", "--out", str(out)])
        == 0
    )
    loaded = load_embeddings(out, class_names("cifar10"))
    assert loaded.dim == 8 and loaded.encoder == "unknown (imported release)"
    assert (
        main(["import", str(tmp_path / "release.pth"), "--classes", "cifar100", "--out", str(out)])
        == 2
    )
