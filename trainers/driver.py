"""Driver side of a training run: resolve the class embeddings, start Ray, fit, and summarise.

Shared by ``python -m trainers.train`` and the Tune sweep.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path

from bitstorm.config import to_dict
from bitstorm.logs import get_logger
from bitstorm.ray_cluster import connect
from bitstorm.storage import absolute, is_uri, open_location, ray_storage
from bitstorm.tracking import check_tracking, tracking_location
from embeddings.build import build_embeddings
from embeddings.descriptions import clean_descriptions, load_descriptions
from embeddings.encoders import load_encoder
from embeddings.store import load_embeddings, save_embeddings
from trainers.backbones import check_backbone
from trainers.config import TrainConfig
from trainers.data import check_data, dataset_class_names
from trainers.heads import head_kind

log = get_logger(__name__)


def resolve_embeddings(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``embeddings`` pointing at a file, building it once when the head needs one
    and none was given (descriptions + text_encoder, cached under ``<output>/embeddings``)."""
    if not head_kind(cfg.head).needs_embeddings:
        return cfg
    names = dataset_class_names(cfg.dataset)
    if cfg.embeddings:
        load_embeddings(cfg.embeddings, names)  # fail here, on the driver, not in every worker
        return dataclasses.replace(cfg, embeddings=str(Path(cfg.embeddings).resolve()))
    path = built_embeddings_path(cfg)
    if not path.is_file():
        log.info("building class embeddings %s", path)
        # llm: the endpoint and model come from the environment (BITSTORM_LLM_*), as the
        # embeddings CLI's defaults do.
        raw = load_descriptions(cfg.descriptions, cfg.dataset, names)
        descriptions = clean_descriptions(raw, names, cfg.descriptions)
        built = build_embeddings(
            names, descriptions, load_encoder(cfg.text_encoder), description_source=cfg.descriptions
        )
        save_embeddings(built, path)
    load_embeddings(path, names)
    return dataclasses.replace(cfg, embeddings=str(path))


def built_embeddings_path(cfg: TrainConfig) -> Path:
    """Where ``resolve_embeddings`` caches the class embeddings it builds for ``cfg`` (from
    ``descriptions`` and ``text_encoder``) when ``embeddings`` is unset."""
    slug = re.sub(
        r"[^A-Za-z0-9.-]+", "_", f"{cfg.dataset}-{Path(cfg.descriptions).stem}-{cfg.text_encoder}"
    )
    return _embeddings_folder(cfg.output) / f"{slug}.safetensors"


def _embeddings_folder(output: str) -> Path:
    """``<output>/embeddings``; for an object-store output, a local cache folder
    (``$XDG_CACHE_HOME/bitstorm/embeddings``): workers read the file by its local path."""
    if is_uri(output):
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "bitstorm" / "embeddings"
    return Path(absolute(output)) / "embeddings"


def fit(cfg: TrainConfig, callbacks: list | None = None):
    """Run ``cfg`` with Ray Train and return Ray's ``Result``.

    Rerunning the same config (same ``output`` and ``name``) resumes from its latest checkpoint:
    after a crash, or to train for more epochs.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.loop import train_loop_per_worker

    check_backbone(cfg.backbone)
    check_data(cfg.dataset, cfg.data_root, download=cfg.download)
    check_tracking(cfg.tracking)
    if cfg.tracking != "none":  # resolved here: the workers run elsewhere
        location = tracking_location(cfg.tracking, cfg.tracking_uri, cfg.output)
        cfg = dataclasses.replace(cfg, tracking_uri=location)
    cfg = resolve_embeddings(cfg)
    if cfg.num_workers == 0:
        log.warning(
            "num_workers=0 runs the loop in this process (Ray Train local mode): "
            "nothing is checkpointed; use it for debugging only"
        )
    # A private local Ray unless RAY_ADDRESS names a cluster (bitstorm.ray_cluster). Ray's own
    # actors log at ERROR only: without Ray's dashboard packages, Train's placement-group
    # watcher would warn every second that the state API is unavailable. The loop prints its
    # own progress line per epoch.
    connect()
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, run_folder=open_location(cfg.run_dir)),
        train_loop_config=to_dict(cfg),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.name,
            **ray_storage(cfg.output),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Ray Train routes print() through its logger, which shows every line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            # Train's own INFO lines (worker group start, a 500-character line per reported
            # epoch) stay in Ray's log files; the loop prints one line per epoch.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()
