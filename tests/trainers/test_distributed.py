"""Ray Train with two CPU workers (gloo): the data really is sharded, and the result matches one
worker with the same global batch. Also: rerunning a run resumes from its latest checkpoint."""

import json

import pytest
import torch

from bitstorm.config import to_dict
from trainers.checkpoint import load_checkpoint, load_train_state, read_manifest
from trainers.config import TrainConfig
from trainers.data import build_data
from trainers.driver import fit
from trainers.loop import make_train_loader

# Same global batch, no BatchNorm or dropout (tiny_cnn): DDP's averaged gradient equals the
# one-worker gradient up to float32 summation order, so after 16 SGD steps the weights agree to
# this tolerance.
WEIGHT_TOLERANCE = 1e-5


def _config(tmp_path, name, workers, epochs=2):
    return TrainConfig(
        backbone="tiny_cnn",
        head="linear",
        dataset="synthetic",
        synthetic_size=320,
        epochs=epochs,
        batch_size=32,
        lr=0.05,
        schedule="constant",
        num_workers=workers,
        max_failures=0,
        output=str(tmp_path),
        name=name,
    )


def _record_shards(config):
    """A Train worker that records which samples its loader gives it, step by step."""
    import ray.train

    cfg = TrainConfig(**config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data = build_data(cfg.dataset, synthetic_size=cfg.synthetic_size)
    indexed = torch.utils.data.TensorDataset(torch.arange(len(data.train)))
    loader = make_train_loader(indexed, cfg, rank, world)
    loader.sampler.set_epoch(0)
    steps = [batch[0].tolist() for batch in loader]
    with open(f"{config['out']}/rank{rank}.json", "w") as handle:
        json.dump({"world": world, "steps": steps}, handle)
    ray.train.report({"steps": len(steps)})


@pytest.fixture(scope="module")
def one_worker(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    return fit(_config(tmp, "one", 1))


def test_two_workers_see_disjoint_shards(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = _config(tmp_path, "shards", 2)
    TorchTrainer(
        _record_shards,
        train_loop_config={"train": to_dict(cfg), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="shards", storage_path=str(tmp_path)),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    seen = [{i for step in r["steps"] for i in step} for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each worker sees a different part
    assert all(len(step) == 16 for r in ranks for step in r["steps"])  # 32 / 2 per worker
    # Step for step, the two shards together are exactly what one worker's batch of 32 holds.
    single = make_train_loader(torch.utils.data.TensorDataset(torch.arange(256)), cfg, 0, 1)
    single.sampler.set_epoch(0)
    for step, batch in enumerate(single):
        assert set(batch[0].tolist()) == set(ranks[0]["steps"][step]) | set(ranks[1]["steps"][step])


def test_two_workers_match_one_worker(ray_local, tmp_path, one_worker):
    two = fit(_config(tmp_path, "two", 2))
    model_1, _ = load_checkpoint(one_worker.checkpoint.path)
    model_2, _ = load_checkpoint(two.checkpoint.path)
    for (name, a), b in zip(
        model_1.state_dict().items(), model_2.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=WEIGHT_TOLERANCE, rtol=0, msg=name)
    assert abs(one_worker.metrics["val_loss"] - two.metrics["val_loss"]) < 1e-4
    assert one_worker.metrics["val_top1"] > 0.25  # it learned: chance is 0.1


def test_rerun_resumes_from_the_latest_checkpoint(ray_local, tmp_path, one_worker):
    fit(_config(tmp_path, "resumed", 1, epochs=1))
    resumed = fit(_config(tmp_path, "resumed", 1, epochs=2))  # same run: picks up after epoch 1
    history = read_manifest(resumed.checkpoint.path)["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    # The weights live in model.safetensors only (sha256-checked); train_state.pt has the rest.
    assert set(load_train_state(resumed.checkpoint.path)) == {"optimizer", "scheduler"}
    # Optimiser state, schedule and data order were restored: identical to an unbroken run.
    model_a, _ = load_checkpoint(resumed.checkpoint.path)
    model_b, _ = load_checkpoint(one_worker.checkpoint.path)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
