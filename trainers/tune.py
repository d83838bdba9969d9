"""``bitstorm tune --config SWEEP`` (or ``python -m trainers.tune``; SWEEP a file, or ``digits``
for the shipped sweep): a Ray Tune sweep over head initialisations x learning rates, with ASHA
early stopping; a results table (one row per trial) and the best checkpoint per head variant.

A sweep file names a base recipe, overrides for it, the variants (each a set of overrides, e.g.
``{head: text, descriptions: templates}``) and the learning rates. ``trial_mode: train`` runs each
trial as a Ray Train run (DDP over its own workers; for clusters); ``trial_mode: function`` runs
each trial's loop inside the Tune trial itself, which is what small machines and tests need (Ray
2.60 leaks a CPU per early-stopped Train-inside-Tune trial on a small local cluster).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitstorm.atomic import json_bytes
from bitstorm.command import FAILED, command_parser, run_command
from bitstorm.config import from_dict, load_config, to_dict
from bitstorm.errors import ConfigError
from bitstorm.logs import get_logger
from bitstorm.storage import absolute, join, ray_storage, uri_of, write_bytes
from trainers.backbones import check_backbone
from trainers.config import TrainConfig, load_train_config
from trainers.data import check_data

log = get_logger(__name__)
TRIAL_MODES = ("function", "train")
SCHEDULERS = ("asha", "none")


@dataclass(frozen=True)
class SweepConfig:
    base: str
    variants: dict[str, Any]
    lrs: list[float]
    overrides: dict[str, Any] = field(default_factory=dict)
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    metric: str = "val_top1"
    max_concurrent_trials: int = 2
    cpus_per_trial: int = 1
    trial_mode: str = "function"
    max_failures: int = 1
    output: str = "runs"
    name: str = "sweep"

    def __post_init__(self) -> None:
        if self.trial_mode not in TRIAL_MODES:
            raise ConfigError(
                f"trial_mode {self.trial_mode!r} is not one of {', '.join(TRIAL_MODES)}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if not self.variants or not self.lrs:
            raise ConfigError("a sweep needs at least one variant and one learning rate")
        if not all(isinstance(v, dict) for v in self.variants.values()):
            raise ConfigError("each variant must be a mapping of recipe overrides")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("grace_period must be >= 1 and reduction_factor >= 2")


def load_sweep(spec: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """A sweep by file path or by the name of a shipped one (``digits``), plus overrides."""
    return load_config(SweepConfig, spec, overrides, package="trainers", folder="sweeps")


def variant_configs(sweep: SweepConfig) -> dict[str, TrainConfig]:
    """One validated ``TrainConfig`` per variant, with class embeddings resolved on the driver."""
    from trainers.driver import resolve_embeddings

    base = load_train_config(sweep.base, [])
    base_dict = {**to_dict(base), **sweep.overrides, "output": sweep.output}
    configs = {}
    for name, changes in sweep.variants.items():
        cfg = from_dict(
            TrainConfig,
            {**base_dict, **changes, "name": f"{sweep.name}-{name}"},
            f"variant {name!r}",
        )
        if sweep.scheduler == "asha" and sweep.grace_period > cfg.epochs:
            raise ConfigError(
                f"grace_period: {sweep.grace_period} epochs, but variant {name!r} trains for "
                f"{cfg.epochs}; ASHA could never stop a trial early: lower grace_period"
            )
        check_backbone(cfg.backbone)
        check_data(cfg.dataset, cfg.data_root, download=cfg.download)
        configs[name] = resolve_embeddings(cfg)
    return configs


def _trial(config: dict[str, Any], configs: dict[str, dict[str, Any]], mode: str) -> None:
    """One Tune trial: the variant's recipe at the trial's learning rate."""
    from ray import tune

    cfg = from_dict(TrainConfig, {**configs[config["variant"]], "lr": config["lr"]})
    if mode == "function":
        from trainers.loop import TuneSession, run_training

        run_training(cfg, TuneSession())
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers import driver

    trial_id = tune.get_context().get_trial_id()
    cfg = dataclasses.replace(cfg, name=f"train-trial_id={trial_id}")
    driver.fit(cfg, callbacks=[TuneReportCallback()])


def run_sweep(sweep: SweepConfig):
    """Run the sweep; return Ray Tune's ``ResultGrid``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    configs = {name: to_dict(cfg) for name, cfg in variant_configs(sweep).items()}
    epochs = max(cfg["epochs"] for cfg in configs.values())
    trainable = tune.with_parameters(_trial, configs=configs, mode=sweep.trial_mode)
    if sweep.trial_mode == "function":
        trainable = tune.with_resources(trainable, {"cpu": sweep.cpus_per_trial})
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=epochs,
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
        )
        if sweep.scheduler == "asha"
        else None
    )
    storage = ray_storage(sweep.output)
    experiment = f"{str(storage['storage_path']).rstrip('/')}/{sweep.name}"
    filesystem = storage.get("storage_filesystem")
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        # A rerun of the same sweep (after a crash, a lost node, a Ctrl-C) keeps its finished
        # trials and resumes the rest; a different sweep needs a different name.
        log.info("resuming sweep %s from %s: finished trials are kept", sweep.name, experiment)
        return tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        ).fit()
    tuner = tune.Tuner(
        trainable,
        param_space={
            "variant": tune.grid_search(list(configs)),
            "lr": tune.grid_search(list(sweep.lrs)),
        },
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode="max",
            scheduler=scheduler,
            max_concurrent_trials=sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            **storage,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        ),
    )
    return tuner.fit()


def summarise(results, sweep: SweepConfig) -> tuple[str, dict[str, dict[str, Any]]]:
    """The results table (CSV text, one row per trial) and the best trial per variant."""
    frame = results.get_dataframe()
    columns = [
        "config/variant",
        "config/lr",
        "epoch",
        sweep.metric,
        "val_loss",
        "val_top2diff",
        "trial_id",
    ]
    table = frame[[c for c in columns if c in frame]].rename(
        columns={"config/variant": "variant", "config/lr": "lr"}
    )
    best: dict[str, dict[str, Any]] = {}
    for result in results:
        if result.error is not None or not result.metrics:
            continue
        variant, score = result.config["variant"], result.metrics.get(sweep.metric)
        if score is not None and (variant not in best or score > best[variant][sweep.metric]):
            best[variant] = {
                sweep.metric: score,
                "lr": result.config["lr"],
                "epoch": result.metrics.get("epoch"),
                "checkpoint": (
                    uri_of(result.checkpoint.filesystem, result.checkpoint.path)
                    if result.checkpoint
                    else None
                ),
            }
    return table.sort_values(["variant", "lr"]).to_csv(index=False), best


def main(argv: list[str] | None = None, prog: str = "python -m trainers.tune") -> int:
    parser = command_parser(
        prog,
        "A Ray Tune sweep over head initialisations x learning rates, with ASHA early "
        "stopping: a results table (one row per trial) and the best checkpoint per head "
        "variant. SWEEP is a sweep file or a shipped sweep's name (digits).",
        fields=SweepConfig,
        examples=("bitstorm tune --config digits", "bitstorm tune --config digits epochs=2"),
    )
    parser.add_argument("--config", required=True, metavar="SWEEP", help="sweep file or name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override sweep fields")
    args = parser.parse_args(argv)
    return run_command(args, lambda: _tune(args))


def _tune(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.config, args.overrides)
    results = run_sweep(sweep)
    table, best = summarise(results, sweep)
    folder = join(absolute(sweep.output), sweep.name)
    write_bytes(join(folder, "results.csv"), table.encode())
    write_bytes(join(folder, "best.json"), json_bytes(best))
    print(table)
    for variant, row in sorted(best.items()):
        print(
            f"best {variant}: {sweep.metric} {row[sweep.metric]:.4f} at lr {row['lr']} "
            f"-> {row['checkpoint']}"
        )
    print(f"wrote {join(folder, 'results.csv')} and {join(folder, 'best.json')}")
    return 0 if best else FAILED


if __name__ == "__main__":
    sys.exit(main())
