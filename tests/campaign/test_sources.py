"""Models from every source (issue 14): a torchvision model from a local state_dict file, a timm
model from a local safetensors file, a factory of the user's; one campaign runs them all, its
rows land in Parquet, and the report names each model's source. Weights never download."""

import pickle
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from bitstorm.errors import ConfigError, DataError
from campaign.analysis.build import build_report
from campaign.analysis.render import console_summary
from campaign.analysis.results import results_of
from campaign.analysis.summary import Options
from campaign.runner import run_campaign
from campaign.sources import load_model, read_state_dict, state_sha256
from campaign.spec import CampaignSpec, ModelEntry


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10)
    torch.save(resnet.state_dict(), folder / "resnet18.pth")
    import timm

    net = timm.create_model("test_efficientnet", num_classes=10)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "t.safetensors")
    return {
        "resnet18": (folder / "resnet18.pth", state_sha256(resnet)),
        "timm": (folder / "t.safetensors", state_sha256(net)),
    }


def _models(weight_files):
    return [
        {
            "name": "tv",
            "torchvision": "resnet18",
            "weights": str(weight_files["resnet18"][0]),
            "num_classes": 10,
        },
        {
            "name": "tm",
            "timm": "test_efficientnet",
            "weights": str(weight_files["timm"][0]),
            "num_classes": 10,
            "input_size": 32,
        },
        {"name": "own", "factory": "tests.campaign.factories:small_net", "kwargs": {"width": 6}},
    ]


def test_each_source_loads_the_weights_it_names(weight_files):
    models = {m["name"]: load_model(ModelEntry(**m)) for m in _models(weight_files)}
    assert models["tv"].facts["weights_sha256"] == weight_files["resnet18"][1]
    assert models["tm"].facts["weights_sha256"] == weight_files["timm"][1]
    assert models["tm"].preprocessing.input_size == 32
    assert models["own"].model[0].out_channels == 6 and not models["own"].model.training
    assert "factory tests.campaign.factories:small_net" in models["own"].facts["source"]
    assert "resnet18.pth (sha256" in models["tv"].facts["source"]


def test_one_campaign_runs_every_source_and_the_report_names_them(
    ray_local, weight_files, tmp_path
):
    spec = CampaignSpec.parse(
        {
            "name": "sources",
            "models": _models(weight_files),
            "dataset": "digits",
            "images": 6,
            "image_selection": "any",
            "trials_per_stratum": 4,
            "bits": [30],
            "formats": ["fp32"],
            "layers": ["*"],
            "output": str(tmp_path),
            "resources": {"actors": 1},
        }
    )
    store = run_campaign(spec, progress=False)
    results = results_of(store)
    counts = dict(results.sql("select model, count(*) from trials group by model").fetchall())
    assert set(counts) == {"tv", "tm", "own"} and all(n > 0 for n in counts.values())
    sources = {name: m["source"] for name, m in results.manifest["models"].items()}
    assert sources["tv"].startswith("torchvision resnet18, weights ")
    assert sources["tm"].startswith("timm test_efficientnet, weights ")
    assert sources["own"] == "factory tests.campaign.factories:small_net, weights its own"
    text = console_summary(build_report([store.root], Options()))
    report = build_report([store.root], Options())
    assert all(m.facts.source == sources[m.name] for m in report.models), text


def test_a_model_with_its_own_weights_is_the_same_in_every_process():
    """Each actor builds a factory's model anew: its initialisation is seeded, so every copy
    has the weights the driver fingerprinted, and the caller's random state is left alone."""
    entry = ModelEntry("own", factory="tests.campaign.factories:small_net")
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    first, second = load_model(entry), load_model(entry)
    assert torch.rand(1) == expected_next
    assert first.facts["weights_sha256"] == second.facts["weights_sha256"]


def test_a_model_that_is_not_a_checkpoint_needs_a_data_set(weight_files, tmp_path):
    spec = CampaignSpec.parse(
        {"name": "x", "models": _models(weight_files)[2:], "output": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match="is not a bitstorm checkpoint, so name the data set"):
        run_campaign(spec, progress=False)


def test_uncached_pretrained_weights_are_one_clear_error_never_a_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    entry = ModelEntry("r", torchvision="resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"not in the torch cache; put https://\S+ at "):
        load_model(entry)
    with pytest.raises(ConfigError, match="not in the Hugging Face cache"):
        load_model(ModelEntry("t", timm="test_efficientnet.r160_in1k"))
    assert time.monotonic() - started < 1.0  # the bound: no network wait, no retries


def test_a_pickle_posing_as_weights_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataError, match="weights_only=True"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({}, "give exactly one of checkpoint, torchvision, timm or factory"),
        ({"torchvision": "resnet18", "timm": "x"}, "got torchvision, timm"),
        ({"factory": "no_colon"}, "is not module:function"),
        ({"torchvision": "resnet18", "kwargs": {"a": 1}}, "only a factory takes"),
        ({"factory": "a:b", "mean": [0.5]}, "give 3 numbers"),
    ],
)
def test_bad_model_entries_are_refused(entry, message):
    with pytest.raises(ConfigError, match=message):
        ModelEntry("m", **entry)


def test_a_folder_of_images_with_a_labels_csv_feeds_a_campaign(ray_local, tmp_path):
    """dataset: images_csv, with the model's preprocessing (here the spec's input size)."""
    from PIL import Image

    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    lines = ["file,label,split"]
    generator = torch.Generator().manual_seed(0)
    for i in range(10):
        pixels = (torch.rand(20, 24, 3, generator=generator) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / "sub" / f"{i}.png")
        lines.append(f"sub/{i}.png,{['cat', 'dog'][i % 2]},{'train' if i < 4 else 'val'}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    model = {"name": "own", "factory": "tests.campaign.factories:small_net", "input_size": 16}
    spec = CampaignSpec.parse(
        {
            "name": "csv",
            "models": [model | {"kwargs": {"num_classes": 2}}],
            "dataset": "images_csv",
            "data_root": str(folder),
            "images": 6,
            "image_selection": "any",
            "trials_per_stratum": 2,
            "bits": [30],
            "output": str(tmp_path / "out"),
            "resources": {"actors": 1},
        }
    )
    results = results_of(run_campaign(spec, progress=False))
    golden = results.sql("select image, label from golden order by image").fetchall()
    assert golden == [(i, i % 2) for i in range(6)]  # the val rows: files 4..9, cat=0, dog=1
    trials = results.sql("select count(*) from trials").fetchall()[0][0]
    assert trials == 2 * 2 * 2  # kinds x layers x trials per stratum
    assert "resize 18, crop 16" in results.manifest["models"]["own"]["preprocessing"]


def _cache_torchvision_weights(torch_home, builder, weights) -> torch.nn.Module:
    """Random weights for ``builder`` where torch's cache would hold ``weights``' file."""
    cached = torch_home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    model = builder(num_classes=1000)
    torch.save(model.state_dict(), cached)
    return model


def test_torchvision_weights_by_name_come_from_the_torch_cache(monkeypatch, tmp_path):
    """A weights enum name reads the file torch's cache would hold (here one the test puts
    there, random weights) and brings that enum's preprocessing."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    model = _cache_torchvision_weights(tmp_path, torchvision.models.resnet18, weights)
    loaded = load_model(ModelEntry("r", torchvision="resnet18", weights=str(weights)))
    assert loaded.facts["weights_sha256"] == state_sha256(model)
    assert loaded.facts["source"] == "torchvision resnet18, weights ResNet18_Weights.IMAGENET1K_V1"
    prep = loaded.preprocessing
    assert (prep.input_size, prep.resize) == (224, 256)
    assert prep.mean == pytest.approx((0.485, 0.456, 0.406))


def test_a_timm_pretrained_tag_comes_from_the_hugging_face_cache(monkeypatch, tmp_path):
    """``name.tag`` reads the weights file the Hugging Face cache would hold (put there by the
    test, in the cache's own layout, with random weights), never the network."""
    import timm

    net = timm.create_model("test_efficientnet", num_classes=1000)
    repo = tmp_path / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, snapshot / "model.safetensors"
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    loaded = load_model(ModelEntry("t", timm="test_efficientnet.r160_in1k"))
    assert loaded.facts["weights_sha256"] == state_sha256(net)
    assert loaded.facts["source"] == "timm test_efficientnet.r160_in1k (pretrained)"
    assert loaded.preprocessing.input_size == 160


def test_the_shipped_pretrained_example_plans_from_the_torch_cache(monkeypatch, tmp_path, capsys):
    """``--spec examples/pretrained_imagenet`` as its header tells a user to run it: both
    models from the torch cache (random weights the test puts there), a small ImageFolder tree
    as ImageNet, one shared preprocessing, and a dry run that plans both models' trials."""
    from PIL import Image

    from campaign.cli import main

    models = torchvision.models
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _cache_torchvision_weights(
        tmp_path / "torch", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1
    )
    _cache_torchvision_weights(
        tmp_path / "torch", models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V1
    )
    imagenet = tmp_path / "imagenet"
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("n01440764", "n01443537"):
            (imagenet / split / label).mkdir(parents=True)
            for i in range(3):
                pixels = (torch.rand(40, 60, 3, generator=generator) * 255).byte().numpy()
                Image.fromarray(pixels).save(imagenet / split / label / f"{i}.png")
    output = tmp_path / "results"
    argv = ["--spec", "examples/pretrained_imagenet", "--dry-run", f"data_root={imagenet}"]
    argv += ["images=4", "image_selection=any", f"output={output}"]
    assert main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    planned = {
        (r[0], r[1]): int(r[3].replace(",", ""))
        for r in rows
        if r[0] in ("resnet18", "mobilenet_v2")
    }
    assert set(planned) == {
        (m, k) for m in ("resnet18", "mobilenet_v2") for k in ("neuron", "weight")
    }
    assert all(n > 0 for n in planned.values()) and not output.exists()
