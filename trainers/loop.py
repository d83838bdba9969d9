"""The per-worker training loop, readable top to bottom as in torchvision's references: build
data, model, optimiser; resume if a checkpoint exists; then train, evaluate, checkpoint, report,
once per epoch.

The loop talks to Ray through a small ``Session`` so the same code runs as a Ray Train worker
(DDP over gloo or NCCL) and as a Ray Tune trial.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from bitstorm.config import from_dict, to_dict
from bitstorm.metrics import top2diff, topk_correct
from bitstorm.tracking import open_tracker
from embeddings.store import load_embeddings
from trainers.checkpoint import (
    fetched_stored,
    file_sha256,
    latest_stored,
    load_train_state,
    load_weights,
    read_manifest,
    save_checkpoint,
)
from trainers.config import TrainConfig
from trainers.data import build_data
from trainers.heads import head_kind
from trainers.models import build_model


class Session(Protocol):
    """What the loop needs from whoever runs it."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None: ...

    def restore(self, load: Callable[[Path], int]) -> int: ...


class TrainSession:
    """A Ray Train worker: DDP when there are several workers. It resumes from Ray's latest
    checkpoint, else from the latest bitstorm checkpoint in the run folder (one a user placed
    there, or one whose Ray snapshot is gone), which Ray Train alone would ignore; the run
    folder is ``filesystem``'s ``run_dir``, as the driver opened it (endpoint included)."""

    def __init__(self, filesystem: pafs.FileSystem, run_dir: str) -> None:
        import ray.train
        import ray.train.torch

        self.filesystem, self.run_dir = filesystem, run_dir
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        import ray.train

        ray.train.report(
            metrics,
            checkpoint=(ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None),
        )

    def restore(self, load: Callable[[Path], int]) -> int:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                return load(Path(folder))
        placed = latest_stored(self.filesystem, self.run_dir)
        if placed is None:
            return 0
        if self.rank == 0:
            print(f"resuming from {placed}, found in the run folder", flush=True)
        with fetched_stored(self.filesystem, placed) as folder:
            return load(folder)


class TuneSession:
    """A Ray Tune function trial: one process, reporting to Tune (and its scheduler)."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        from ray import tune

        tune.report(
            metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None
        )

    def restore(self, load: Callable[[Path], int]) -> int:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as folder:
            return load(Path(folder))


class _BadInputTracebacks(logging.Filter):
    """Drops Ray Train's log of a worker's exception when it is bad input (a BitstormError):
    the driver prints that one message itself (trainers.train), so its traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "\nbitstorm.errors." not in record.getMessage()


def train_loop_per_worker(
    config: dict[str, Any], *, run_folder: tuple[pafs.FileSystem, str]
) -> None:
    """Entry point for ``TorchTrainer``, with ``run_folder`` bound by the driver: the run
    folder's file system as the driver opened it (its endpoint), and its path there."""
    from ray.train.v2._internal.execution import context as train_context

    # The logger that Ray Train (v2) reports a training function's exception on.
    logging.getLogger("ray.train.v2._internal.util").addFilter(_BadInputTracebacks())
    # The one that logs a ~500-character "Reporting training result" line per report at INFO:
    # named by its file path, it escapes the run's logging_config (trainers.driver).
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    run_training(from_dict(TrainConfig, config), TrainSession(*run_folder))


def run_training(cfg: TrainConfig, session: Session) -> None:
    torch.manual_seed(cfg.seed)
    data = build_data(
        cfg.dataset,
        cfg.data_root,
        download=cfg.download,
        image_size=cfg.image_size,
        seed=cfg.seed,
        synthetic_size=cfg.synthetic_size,
    )
    class_rows, descriptions_sha256, embeddings_file_sha256 = None, None, None
    if head_kind(cfg.head).needs_embeddings:
        # cfg.embeddings is a file path by now: trainers.driver.resolve_embeddings names the
        # given file, or the one it built, before the workers start.
        loaded = load_embeddings(cfg.embeddings, data.class_names)
        class_rows, descriptions_sha256 = loaded.embeddings, loaded.description_hash
        embeddings_file_sha256 = file_sha256(cfg.embeddings)
    model = build_model(
        cfg.backbone,
        cfg.head,
        data.num_classes,
        class_rows,
        embedding_dim=cfg.embedding_dim,
        small_input=cfg.small_input,
        pretrained=cfg.pretrained,
        seed=cfg.seed,
    )
    model = session.prepare_model(model)
    train_loader = make_train_loader(data.train, cfg, session.rank, session.world_size)
    val_loader = make_eval_loader(data.val, cfg, session.rank, session.world_size)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    use_amp = cfg.amp and session.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[dict[str, float]] = []

    def resume(folder: Path) -> int:
        manifest = read_manifest(folder)
        _unwrap(model).load_state_dict(load_weights(folder, manifest))
        state = load_train_state(folder)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history.extend(manifest["history"])
        return int(manifest["epoch"])

    start_epoch = session.restore(resume)
    # rank 0 alone tracks, as it alone prints and checkpoints
    tracking = cfg.tracking if session.rank == 0 else "none"
    tracker = open_tracker(tracking, cfg.name, cfg.tracking_uri)
    tracker.log_params(to_dict(cfg))
    try:
        for epoch in range(start_epoch, cfg.epochs):
            train_loader.sampler.set_epoch(epoch)
            started = time.perf_counter()
            train = run_epoch(model, train_loader, session.device, cfg, optimizer, scaler, use_amp)
            seconds = time.perf_counter() - started
            val = run_epoch(model, val_loader, session.device, cfg)
            scheduler.step()
            metrics = {
                "epoch": epoch + 1,
                # not "lr": a Tune sweep's results table holds the config's lr beside the metrics
                "learning_rate": optimizer.param_groups[0]["lr"],
                "images_per_s": train["count"] / seconds,
                **{f"train_{k}": v for k, v in train.items() if k != "count"},
                **{f"val_{k}": v for k, v in val.items() if k != "count"},
            }
            history.append(metrics)
            if session.rank == 0:
                print(progress_line(metrics, cfg.epochs), flush=True)
                tracker.log_metrics(metrics, step=epoch + 1)
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = None
                if session.rank == 0:
                    checkpoint = save_checkpoint(
                        folder,
                        _unwrap(model),
                        cfg,
                        class_names=data.class_names,
                        epoch=epoch + 1,
                        history=history,
                        descriptions_sha256=descriptions_sha256,
                        embeddings_file_sha256=embeddings_file_sha256,
                        train_state={
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                        },
                    )
                session.report(metrics, checkpoint)
    finally:
        tracker.close()


def progress_line(metrics: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {int(metrics['epoch'])}/{epochs}  train loss {metrics['train_loss']:.4f} "
        f"top-1 {metrics['train_top1']:.2%}  val loss {metrics['val_loss']:.4f} "
        f"top-1 {metrics['val_top1']:.2%} top-5 {metrics['val_top5']:.2%} "
        f"Top2Diff {metrics['val_top2diff']:.1f}  ({metrics['images_per_s']:.0f} images/s)"
    )


def make_train_loader(dataset: Dataset, cfg: TrainConfig, rank: int, world_size: int) -> DataLoader:
    """Shards by DistributedSampler for any world size, so that one worker with global batch B
    sees, step for step, the union of what W workers with B / W each see."""
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size // world_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.loader_workers,
    )


def make_eval_loader(dataset: Dataset, cfg: TrainConfig, rank: int, world_size: int) -> DataLoader:
    """Every evaluation image exactly once across workers (no padding, unlike
    DistributedSampler), so the all-reduced metrics are exact."""
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(
        shard, batch_size=max(1, cfg.batch_size // world_size), num_workers=cfg.loader_workers
    )


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.effective_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.effective_lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    use_amp: bool = False,
) -> dict[str, float]:
    """One pass: trains when given an optimiser, else evaluates. Returns loss, top-1, top-5 and
    mean Top2Diff over every image of every worker."""
    training = optimizer is not None
    model.train(training)
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, t2d, count
    with torch.set_grad_enabled(training):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            logits = logits.detach().float()
            totals += torch.stack(
                [
                    loss.detach().double() * len(labels),
                    topk_correct(logits, labels, 1).sum().double(),
                    topk_correct(logits, labels, 5).sum().double(),
                    top2diff(logits).nan_to_num(0.0).sum().double(),
                    torch.tensor(float(len(labels)), dtype=torch.float64, device=device),
                ]
            )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, t2d, count = totals.tolist()
    count = max(count, 1.0)
    return {
        "loss": loss / count,
        "top1": top1 / count,
        "top5": top5 / count,
        "top2diff": t2d / count,
        "count": count,
    }


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
