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
from campaign.sites import LayerSite, find_sites, select_layers
from campaign.spec import CampaignSpec
from campaign.stats import stratified_estimate
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
    sites = {}
    for name, model in models.items():
        names = select_layers(model, types=spec.layer_types)
        for pattern in spec.layers:
            if not any(fnmatch.fnmatchcase(layer, pattern) for layer in names):
                raise ConfigError(
                    f"layers: {pattern!r} matches no {spec.layer_types} layer of "
                    f"model {name!r} (e.g. {', '.join(list(names)[:4])})"
                )
        example = _example_input(spec, model)
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
    manifest = _manifest(spec, plan, images, status="running")
    store.write_json(store.manifest_path, manifest)
    pending = [s for s in plan if not store.exists(_path(store, s))]
    total = sum(s.size(len(images.indices)) for s in plan)
    done = total - sum(s.size(len(images.indices)) for s in pending)
    log.info(
        "campaign %s: %d shards (%d to run), %d trials", spec.name, len(plan), len(pending), total
    )
    if pending:
        _execute(spec, images, pending, done, total, progress)
    store.write_json(store.manifest_path, _manifest(spec, plan, images, status="complete"))
    return summarise(store)


def _execute(
    spec: CampaignSpec,
    images: CampaignImages,
    pending: list[Shard],
    done: int,
    total: int,
    progress: bool,
) -> None:
    import ray
    from ray.exceptions import RayActorError

    if not ray.is_initialized():
        ray.init(logging_config=ray.LoggingConfig(log_level="ERROR"))
    worker_class = ray.remote(ShardWorker)
    options = {"num_cpus": spec.cpus_per_actor, "num_gpus": spec.gpus_per_actor}
    count = min(spec.actors, len(pending))
    generation = [0] * count

    def start(slot: int):
        name = f"bitstorm-{spec.name}-worker-{slot}-{generation[slot]}"
        return worker_class.options(name=name, **options).remote(spec, images)

    actors = [start(slot) for slot in range(count)]
    queue: deque[Shard] = deque(pending)
    in_flight: dict[Any, tuple[Shard, int, int]] = {}
    retries: Counter[int] = Counter()

    def submit(slot: int) -> None:
        while queue and sum(1 for _, s, _ in in_flight.values() if s == slot) < IN_FLIGHT_PER_ACTOR:
            shard = queue.popleft()
            in_flight[actors[slot].run.remote(shard)] = (shard, slot, generation[slot])

    for slot in range(count):
        submit(slot)
    bar = tqdm(
        total=total,
        initial=done,
        unit="trial",
        unit_scale=True,
        disable=not progress,
        desc=f"campaign {spec.name}",
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
            if born == generation[slot]:  # the first failure seen from this actor: replace it
                log.warning("actor %d died; retrying its shards on a fresh actor", slot)
                generation[slot] += 1
                actors[slot] = start(slot)
            submit(slot)
            continue
        bar.update(result["rows"])
        submit(slot)
    bar.close()
    log.info("ran %d shards in %.1f s", len(pending), time.perf_counter() - started)


def summarise(store: Store) -> list[SummaryRow]:
    """SDC rate per model and kind: each stratum (layer x format x bit) weighted by its share of
    the fault space (the layer's sites, from the plan), with a 95% interval."""
    import duckdb

    manifest = store.read_json(store.manifest_path) or {}
    sites = {
        (s["model"], s["kind"], s["layer"], s["fmt"]): s["sites"]
        for s in manifest.get("plan", {}).get("shard_list", [])
    }
    rows = duckdb.sql(
        "select model::varchar, kind::varchar, layer::varchar, format, bit, count(*), "
        "sum(sdc::int) from read_parquet("
        f"'{store.root}/trials/**/*.parquet', hive_partitioning=true) "
        "group by all order by 1, 2"
    ).fetchall()
    strata: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
    for model, kind, layer, fmt, _bit, n, k in rows:
        population = sites.get((model, kind, layer, fmt), 1)
        strata.setdefault((model, kind), []).append((int(k), int(n), population))
    summary = []
    for (model, kind), counts in sorted(strata.items()):
        k, n, population = zip(*counts, strict=True)
        estimate = stratified_estimate(k, n, population)
        summary.append(
            SummaryRow(model, kind, sum(n), sum(k), estimate.rate, estimate.low, estimate.high)
        )
    return summary


def format_summary(rows: list[SummaryRow]) -> str:
    lines = [
        f"{'model':<20}{'kind':<8}{'trials':>10}{'SDC rate':>11}  95% interval "
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


def _example_input(spec: CampaignSpec, model: torch.nn.Module) -> tuple[int, ...]:
    from campaign.workers import campaign_dataset
    from trainers.data import build_data

    dataset = campaign_dataset(spec)
    if dataset in ("digits", "synthetic", "cifar10", "cifar100"):
        return (3, 32, 32)
    return tuple(build_data(dataset, spec.data_root).val[0][0].shape)


def _manifest(
    spec: CampaignSpec, plan: list[Shard], images: CampaignImages, status: str
) -> dict[str, Any]:
    import duckdb
    import pyarrow
    import ray

    return {
        "status": status,
        "fingerprint": spec.fingerprint(),
        "spec": to_dict(spec),
        "images": images.indices,
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
