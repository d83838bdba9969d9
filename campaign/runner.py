"""The campaign driver: validate, plan, hand shards to a pool of Ray actors, resume, summarise.

The driver holds shard descriptors and counts, never trial rows: actors write their own Parquet
shards. A shard is done exactly when its file exists (it is written under a temporary name and
renamed), so a rerun skips finished shards and redoes the rest; a shard whose actor dies is
retried on a fresh actor and, being deterministic, rewrites the same rows to the same path.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import platform
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from bitstorm import __version__
from bitstorm.config import to_dict
from bitstorm.errors import ConfigError, DataError
from campaign.plan import Shard, make_plan
from campaign.results import by_estimate, counts, estimate, results_of
from campaign.sequential import run_rounds
from campaign.sites import LayerSite, find_sites, select_layers
from campaign.spec import CampaignSpec
from campaign.store import Store
from campaign.workers import CampaignImages, ShardWorker, golden_table, load_models, select_images
from embeddings.store import load_embeddings
from trainers.checkpoint import read_manifest

log = logging.getLogger(__name__)
MAX_SHARD_RETRIES = 3
IN_FLIGHT_PER_ACTOR = 2


@dataclass(frozen=True)
class SummaryRow:
    """A model's SDC rate for one fault kind: the stratified estimate over the fault space."""

    model: str
    kind: str
    trials: int
    sdc: int
    rate: float
    low: float
    high: float
    confidence: float
    variance: float


def validate(spec: CampaignSpec) -> tuple[dict[str, torch.nn.Module], dict[str, list[LayerSite]]]:
    """Everything that can be checked before work starts: checkpoints, embedding files, layer
    globs. Returns the models and their selected fault sites."""
    for entry in spec.model_entries():
        try:
            manifest = read_manifest(entry.checkpoint)
        except DataError as error:
            raise ConfigError(f"models[{entry.name}].checkpoint: {error}") from None
        if entry.embeddings:
            try:
                embeddings = load_embeddings(entry.embeddings, manifest["class_names"])
            except DataError as error:
                raise ConfigError(f"models[{entry.name}].embeddings: {error}") from None
            if embeddings.description_hash != manifest.get("embeddings_sha256"):
                raise ConfigError(
                    f"models[{entry.name}].embeddings: {entry.embeddings} is not "
                    "the embedding file this checkpoint was trained with"
                )
    models = load_models(spec)
    example = _example_input(spec)
    sites = {}
    for name, model in models.items():
        names = select_layers(model, types=spec.layer_types)
        for pattern in spec.layers:
            if not any(fnmatch.fnmatchcase(layer, pattern) for layer in names):
                raise ConfigError(
                    f"layers: {pattern!r} matches no {spec.layer_types} layer of "
                    f"model {name!r} (e.g. {', '.join(list(names)[:4])})"
                )
        sites[name] = list(
            find_sites(
                model,
                example,
                types=spec.layer_types,
                include=spec.layers,
                exclude=spec.exclude_layers,
            )
        )
    return models, sites


def run_campaign(
    spec: CampaignSpec, *, fresh: bool = False, progress: bool = True
) -> list[SummaryRow]:
    models, sites = validate(spec)
    store = Store.open(spec.output, spec.name)
    if fresh:
        store.filesystem.delete_dir_contents(store.root, missing_dir_ok=True)
    previous = store.read_json(store.manifest_path)
    if previous and previous.get("fingerprint") != spec.fingerprint():
        raise ConfigError(
            f"{store.root} holds results of a different campaign spec; pass "
            "--fresh to replace them, or choose another name or output"
        )
    images = select_images(spec, models)
    for name, model in models.items():
        path = store.golden_path(name)
        if not store.exists(path):
            store.write_table(path, golden_table(model, images))
    plan = make_plan(spec, sites, len(images.indices))
    targets = None
    with ShardPool(spec, images, progress) as pool:
        _run_round(store, spec, images, plan, plan, pool, "")
        if spec.sampling == "sequential":
            # Each round's decision reads only the shards of earlier rounds (ids grow with the
            # rounds), so a resumed campaign replays the same decisions.
            statuses = run_rounds(
                spec,
                plan,
                lambda limit: results_of(store).strata(where=f"shard < {limit}"),
                lambda shards, r: _run_round(
                    store, spec, images, plan, shards, pool, f" round {r}"
                ),
            )
            targets = [dataclasses.asdict(status) for status in statuses]
    store.write_json(
        store.manifest_path, _manifest(spec, plan, images, status="complete", targets=targets)
    )
    return summarise(store, spec.confidence)


def _run_round(
    store: Store,
    spec: CampaignSpec,
    images: CampaignImages,
    plan: list[Shard],
    shards: list[Shard],
    pool: ShardPool,
    label: str,
) -> None:
    """Record the plan so far, then run the shards of this round that have no file yet."""
    store.write_json(store.manifest_path, _manifest(spec, plan, images, status="running"))
    pending = [s for s in shards if not store.exists(_path(store, s))]
    sizes = [s.size(len(images.indices)) for s in shards]
    todo = sum(s.size(len(images.indices)) for s in pending)
    log.info(
        "campaign %s%s: %d shards (%d to run), %d trials",
        spec.name,
        label,
        len(shards),
        len(pending),
        sum(sizes),
    )
    if pending:
        pool.run(pending, done=sum(sizes) - todo, total=sum(sizes), label=label)


class ShardPool:
    """A pool of Ray actors that evaluate shards, replacing actors that die; kept across the
    rounds of a sequential campaign so models and golden caches load once."""

    def __init__(self, spec: CampaignSpec, images: CampaignImages, progress: bool) -> None:
        self.spec, self.images, self.progress = spec, images, progress
        self.actors: list[Any] = []
        self.generation: list[int] = []

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def _start(self, slot: int) -> Any:
        import ray

        if not ray.is_initialized():
            ray.init(logging_config=ray.LoggingConfig(log_level="ERROR"))
        name = f"bitstorm-{self.spec.name}-worker-{slot}-{self.generation[slot]}"
        options = {"num_cpus": self.spec.cpus_per_actor, "num_gpus": self.spec.gpus_per_actor}
        return ray.remote(ShardWorker).options(name=name, **options).remote(self.spec, self.images)

    def run(self, pending: list[Shard], done: int, total: int, label: str) -> None:
        import ray
        from ray.exceptions import RayActorError

        while len(self.actors) < min(self.spec.actors, len(pending)):
            self.generation.append(0)
            self.actors.append(self._start(len(self.actors)))
        queue: deque[Shard] = deque(pending)
        in_flight: dict[Any, tuple[Shard, int, int]] = {}
        retries: Counter[int] = Counter()

        def submit(slot: int) -> None:
            while (
                queue
                and sum(1 for _, s, _ in in_flight.values() if s == slot) < IN_FLIGHT_PER_ACTOR
            ):
                shard = queue.popleft()
                in_flight[self.actors[slot].run.remote(shard)] = (
                    shard,
                    slot,
                    self.generation[slot],
                )

        for slot in range(len(self.actors)):
            submit(slot)
        bar = tqdm(
            total=total,
            initial=done,
            unit="trial",
            unit_scale=True,
            disable=not self.progress,
            desc=f"campaign {self.spec.name}{label}",
        )
        started = time.perf_counter()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            shard, slot, born = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError:
                retries[shard.id] += 1
                if retries[shard.id] > MAX_SHARD_RETRIES:
                    raise DataError(
                        f"shard {shard.id} failed {MAX_SHARD_RETRIES} times: its "
                        "actors keep dying (out of memory?)"
                    ) from None
                queue.appendleft(shard)
                if born == self.generation[slot]:  # first failure seen from it: replace it
                    log.warning("actor %d died; retrying its shards on a fresh actor", slot)
                    self.generation[slot] += 1
                    self.actors[slot] = self._start(slot)
                submit(slot)
                continue
            bar.update(result["rows"])
            submit(slot)
        bar.close()
        log.info("ran %d shards in %.1f s", len(pending), time.perf_counter() - started)


def summarise(store: Store, confidence: float = 0.95) -> list[SummaryRow]:
    """SDC rate per model and kind: each stratum (layer x format x bit) weighted by its share of
    the fault space (the layer's sites, from the plan), with an interval at ``confidence``."""
    summary = []
    for (model, kind), members in by_estimate(results_of(store).strata()).items():
        successes, trials, _ = counts(members)
        rate = estimate(members, confidence)
        summary.append(
            SummaryRow(
                model,
                kind,
                sum(trials),
                sum(successes),
                rate.rate,
                rate.low,
                rate.high,
                confidence,
                rate.variance,
            )
        )
    return summary


def format_summary(rows: list[SummaryRow]) -> str:
    confidence = rows[0].confidence if rows else 0.95
    lines = [
        f"{'model':<20}{'kind':<8}{'trials':>10}{'SDC rate':>11}  {confidence:.0%} interval "
        "(stratified by layer x format x bit, weighted by fault-space share)"
    ]
    for row in rows:
        lines.append(
            f"{row.model:<20}{row.kind:<8}{row.trials:>10,}{row.rate:>10.3%}  "
            f"[{row.low:.3%}, {row.high:.3%}]"
        )
    return "\n".join(lines)


def _path(store: Store, shard: Shard) -> str:
    return store.shard_path(shard.model, shard.kind, shard.layer, shard.id)


def _example_input(spec: CampaignSpec) -> tuple[int, ...]:
    from campaign.workers import campaign_dataset
    from trainers.data import build_data

    dataset = campaign_dataset(spec)
    if dataset in ("digits", "synthetic", "cifar10", "cifar100"):
        return (3, 32, 32)
    return tuple(build_data(dataset, spec.data_root).val[0][0].shape)


def model_facts(checkpoint: str) -> dict[str, Any]:
    """What a report needs to know about a model without its checkpoint at hand."""
    manifest = read_manifest(checkpoint)
    config = manifest["config"]
    return {
        "backbone": config["backbone"],
        "head": config["head"],
        "dataset": config["dataset"],
        "val_top1": manifest.get("metrics", {}).get("val_top1"),
        "epoch": manifest.get("epoch"),
    }


def _manifest(
    spec: CampaignSpec,
    plan: list[Shard],
    images: CampaignImages,
    status: str,
    targets: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    import duckdb
    import pyarrow
    import ray

    return {
        "status": status,
        # sequential sampling: where each model x kind estimate ended, margin met or not
        "targets": targets,
        "fingerprint": spec.fingerprint(),
        "spec": to_dict(spec),
        "images": images.indices,
        "models": {entry.name: model_facts(entry.checkpoint) for entry in spec.model_entries()},
        "plan": {
            "shards": len(plan),
            "trials": sum(s.size(len(images.indices)) for s in plan),
            "shard_list": [dataclasses.asdict(s) for s in plan],
        },
        "versions": {
            "bitstorm": __version__,
            "torch": torch.__version__,
            "ray": ray.__version__,
            "pyarrow": pyarrow.__version__,
            "duckdb": duckdb.__version__,
            "python": platform.python_version(),
        },
    }
