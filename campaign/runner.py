"""The campaign driver: validate, plan, hand shards to the actor pool, resume, record.

The driver holds shard descriptors and counts, never trial rows: actors write their own Parquet
shards. A shard is done exactly when its file exists and is sealed as the plan's shard (written
under a temporary name, fsynced and renamed; its footer carries its id, trials and a digest of
which trials), so a rerun skips finished shards, moves damaged ones aside and redoes the rest.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import platform
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from bitstorm.config import to_dict
from bitstorm.errors import ConfigError, DataError
from bitstorm.logs import get_logger
from bitstorm.ray_cluster import check_grantable, connect
from bitstorm.storage import is_uri
from bitstorm.tracking import check_tracking, open_tracker, tracking_location
from bitstorm.version import __version__
from campaign.analysis.results import overall_rates, results_of
from campaign.faults.sites import LayerSite, find_sites, select_layers
from campaign.images import CampaignImages, campaign_data, load_models, select_images
from campaign.passes import data_passes, remote_data_passes
from campaign.plan import Pack, Shard, make_packs, make_plan, site_count
from campaign.pool import LocalPool, Pool, ShardPool
from campaign.profile import Profile
from campaign.sequential import run_rounds
from campaign.spec import CampaignSpec, changed_fields
from campaign.store import GOLDEN_SCHEMA, LAYOUT, Store
from trainers.checkpoint import fetched_checkpoint, read_manifest, verify_embeddings
from trainers.data import DataBundle

log = get_logger(__name__)


@dataclass(frozen=True)
class CheckedCampaign:
    """What validation found: each model's facts (campaign.sources), the model, its fault
    sites, and the data its images come from."""

    facts: dict[str, dict[str, Any]]
    models: dict[str, torch.nn.Module]
    sites: dict[str, list[LayerSite]]
    data: DataBundle

    @property
    def model_ids(self) -> dict[str, str]:
        """Each model's identity by content: the sha256 of its weights."""
        return {name: facts["weights_sha256"] for name, facts in self.facts.items()}


def validate(spec: CampaignSpec) -> CheckedCampaign:
    """Everything that can be checked before work starts: the models and their weights,
    embedding files, the data, layer globs."""
    for entry in spec.models:
        if entry.embeddings:
            try:
                with fetched_checkpoint(entry.checkpoint) as (folder, _where):
                    manifest = read_manifest(folder)
                verify_embeddings(manifest, entry.embeddings)
            except DataError as error:
                raise ConfigError(f"models[{entry.name}].embeddings: {error}") from None
    loaded = load_models(spec)
    data = campaign_data(spec, loaded)
    for entry in loaded.values():
        entry.facts["dataset"] = entry.facts["dataset"] or spec.dataset
    models = {name: entry.model for name, entry in loaded.items()}
    facts = {name: entry.facts for name, entry in loaded.items()}
    return CheckedCampaign(facts, models, check_sites(spec, models, data), data)


def check_sites(
    spec: CampaignSpec, models: Mapping[str, torch.nn.Module], data: DataBundle
) -> dict[str, list[LayerSite]]:
    """Each model's fault sites, refusing a layer glob that matches nothing and a last layer
    that ``exhaustive_last_layer`` cannot count."""
    sites = {}
    for name, model in models.items():
        names = select_layers(model, types=spec.layer_types)
        for pattern in spec.layers:
            if not any(fnmatch.fnmatchcase(layer, pattern) for layer in names):
                raise ConfigError(
                    f"layers: {pattern!r} matches no {spec.layer_types} layer of "
                    f"model {name!r} (e.g. {', '.join(list(names)[:4])})"
                )
        space = find_sites(
            model,
            data.image_shape,
            types=spec.layer_types,
            include=spec.layers,
            exclude=spec.exclude_layers,
        )
        sites[name] = list(space)
        if spec.exhaustive_last_layer:
            _check_final_layers(name, model, data, sites[name], spec.kinds)
    return sites


def _check_final_layers(
    name: str,
    model: torch.nn.Module,
    data: DataBundle,
    sites: list[LayerSite],
    kinds: list[str],
) -> None:
    """exhaustive_last_layer needs each kind's last layer to be a final classifier the
    analytic path covers (a Linear whose output is the logits, or those times a constant)."""
    from campaign.faults.engine import Engine

    engine = Engine(model, torch.zeros(2, *data.image_shape), device="cpu")
    for kind in kinds:
        layers = [site.name for site in sites if site_count(site, kind) > 0]
        if layers and not engine.analytic(layers[-1]):
            raise ConfigError(
                f"exhaustive_last_layer: model {name!r}'s last {kind} layer {layers[-1]!r} is "
                "not a final Linear whose output is the logits (as is, or times a constant); "
                "select layers that end at the classifier, or sample it"
            )


@dataclass(frozen=True)
class PlannedCampaign:
    """What a campaign would run, found without running it (``--dry-run``): the trials of its
    first round per model and kind, and the shards and files they fill."""

    name: str
    output: str
    images: dict[str, int]  # per model
    trials: dict[tuple[str, str], int]  # per (model, kind)
    shards: int
    files: int
    sequential: bool  # later rounds add trials where intervals are still wide

    def table(self) -> str:
        rows = [f"campaign {self.name!r} -> {self.output} (dry run: nothing runs or is written)"]
        rows += [f"{'model':<16}{'kind':<10}{'images':>8}{'trials':>14}"]
        for (model, kind), trials in self.trials.items():
            rows.append(f"{model:<16}{kind:<10}{self.images[model]:>8,}{trials:>14,}")
        total = sum(self.trials.values())
        rows.append(f"{'total':<34}{total:>14,}  in {self.shards:,} shards, {self.files:,} files")
        if self.sequential:
            rows.append("sequential sampling: this is the first round; later rounds add trials")
        return "\n".join(rows)


def plan_campaign(spec: CampaignSpec) -> PlannedCampaign:
    """Validate ``spec``, select its images and plan it, as a run would, without Ray or a
    single write: a user sees a campaign's size before spending a cluster on it."""
    checked = validate(spec)
    counts, plan, files = _first_plan(
        spec, checked.sites, select_images(spec, checked.models, checked.data)
    )
    trials: Counter[tuple[str, str]] = Counter()
    for shard in plan:
        trials[shard.model, shard.kind] += shard.size(counts[shard.model])
    return PlannedCampaign(
        name=spec.name,
        output=spec.output,
        images=counts,
        trials=dict(sorted(trials.items())),
        shards=len(plan),
        files=files,
        sequential=spec.sampling == "sequential",
    )


def _first_plan(
    spec: CampaignSpec, sites: dict[str, list[LayerSite]], images: dict[str, CampaignImages]
) -> tuple[dict[str, int], list[Shard], int]:
    """Each model's number of campaign images, the planned shards and how many files they
    fill: what a dry run reports is what a run starts from."""
    counts = {name: len(i.indices) for name, i in images.items()}
    plan = make_plan(spec, sites, counts)
    return counts, plan, len(make_packs(plan, counts, spec.shard_size))


def run_campaign(
    spec: CampaignSpec,
    *,
    fresh: bool = False,
    progress: bool = True,
    address: str | None = None,
    checked: CheckedCampaign | None = None,
    local: bool = False,
) -> Store:
    """Run (or resume) the campaign; returns its store, every planned trial on disk.
    ``address``: a Ray cluster to join (else ``RAY_ADDRESS``; else a private local Ray).
    ``checked``: models and data handed over (campaign.api) instead of loaded from the spec;
    ``local``: run the shards in this process, without Ray."""
    # Everything a user can get wrong is refused before anything is written.
    started = time.perf_counter()
    check_tracking(spec.tracking)
    given = checked is not None
    checked = checked or validate(spec)
    fingerprint = spec.fingerprint(checked.model_ids)
    resources = spec.resources
    # A bucket or endpoint that is not there is refused before Ray starts; a local folder is
    # made only once the actors' shape is known to fit and the images qualify (a refused
    # campaign writes nothing).
    try:
        probe = Store.open(spec.output, spec.name, create=is_uri(spec.output))
    except ConfigError as error:  # a URI no file system opens: say which field holds it
        raise ConfigError(f"output {error}") from None
    private = False
    if not local:
        private = connect(address)
        check_grantable(resources.cpus_per_actor, resources.gpus_per_actor, private)
    cached = None if fresh else probe.read_json(probe.profile_path)
    cached_profile = None if cached is None else Profile(**cached)
    layers = {name: [site.name for site in sites] for name, sites in checked.sites.items()}
    handed = checked.models if given else None  # actors load a spec's models themselves
    # On a cluster the driver may be a CPU head node: the passes go where the actors run. A
    # private local Ray with CPU actors runs on this machine anyway, so they run here, with
    # every thread of the driver, and no process to start.
    if local or (private and resources.gpus_per_actor == 0):
        passes = data_passes(spec, checked.models, layers, checked.data, cached_profile)
    else:
        passes = remote_data_passes(spec, handed, layers, checked.data, cached_profile)
    images, profile = passes.images, passes.profile
    store = Store.open(spec.output, spec.name)
    if fresh:
        store.filesystem.delete_dir_contents(store.root, missing_dir_ok=True)
    if removed := store.remove_temporaries():
        log.info("removed %d temporary files an interrupted run left", removed)
    previous = store.read_json(store.manifest_path)
    if previous and previous.get("layout") != LAYOUT:
        raise ConfigError(
            f"{store.root} holds results in an earlier bitstorm's file layout; pass --fresh "
            "to rerun the campaign into this one, or choose another name or output"
        )
    if previous and previous.get("fingerprint") != fingerprint:
        changed = changed_fields(previous.get("measured", {}), spec.measured(checked.model_ids))
        raise ConfigError(
            f"{store.root} holds results of a different campaign spec ({changed}); pass "
            "--fresh to replace them, or choose another name or output"
        )
    if profile is not None and cached_profile is None:
        store.write_json(store.profile_path, dataclasses.asdict(profile))
    _, plan, files = _first_plan(spec, checked.sites, images)
    facts = {name: dict(f) for name, f in checked.facts.items()}
    for name, value in passes.val_top2diff.items():
        facts[name]["val_top2diff"] = value
    record = _Recorder(store, spec, checked, fingerprint, images, plan, profile, facts)
    targets = None
    pool_type = LocalPool if local else ShardPool
    with pool_type(spec, store, images, profile, progress, handed) as pool:
        pool.start(files)
        pool.use_golden({name: record.golden(name, pool) for name in checked.models})
        record.run_round(plan, pool, "")
        if spec.sampling == "sequential":
            # Each round's decision reads only the shards of earlier rounds (ids grow with the
            # rounds), so a resumed campaign replays the same decisions.
            statuses = run_rounds(
                spec,
                plan,
                lambda limit: results_of(store).strata(where=f"shard < {limit}"),
                lambda shards, r: record.run_round(shards, pool, f" round {r}"),
            )
            targets = [dataclasses.asdict(status) for status in statuses]
        record.nodes.update(pool.trials_by_node)
        record.settled.update(pool.settled)
        record.seconds["running trials"] = pool.run_seconds
        ran = pool.trials_by_node.total()
        for technique, count in pool.settled.items():
            log.info(
                "%d of the %d trials run (%.1f%%) needed no forward: %s",
                count,
                ran,
                100 * count / ran,
                technique,
            )
    record.seconds["total"] = time.perf_counter() - started
    record.write("complete", targets)
    track_summary(spec, store)
    return store


def track_summary(spec: CampaignSpec, store: Store) -> None:
    """Log the finished campaign to the spec's tracker: its fields as parameters, and each
    model x kind's overall SDC rate with its interval and trials as metrics."""
    if spec.tracking == "none":
        return
    location = tracking_location(spec.tracking, spec.tracking_uri, spec.output)
    tracker = open_tracker(spec.tracking, spec.name, location)
    try:
        tracker.log_params(to_dict(spec) | {"models": [m.name for m in spec.models]})
        metrics = {}
        for (model, kind), rate in overall_rates(results_of(store), spec.confidence).items():
            for name in ("rate", "low", "high", "trials", "sdc"):
                metrics[f"{model}.{kind}.sdc_{name}"] = getattr(rate, name)
        tracker.log_metrics(metrics, step=0)
    finally:
        tracker.close()
    log.info("campaign %s: summary logged to %s (%s)", spec.name, spec.tracking, location)


@dataclass(frozen=True)
class _Recorder:
    """Writes the manifest as the campaign goes and runs the shards that have no file yet."""

    store: Store
    spec: CampaignSpec
    checked: CheckedCampaign
    fingerprint: str
    images: dict[str, CampaignImages]
    plan: list[Shard]  # grows with the rounds of sequential sampling
    profile: Profile | None
    facts: dict[str, dict[str, Any]]  # the manifest's ``models``

    nodes: Counter[str] = dataclasses.field(default_factory=Counter)  # trials run per node
    # of them, settled with no forward, per technique (campaign.faults.masking)
    settled: Counter[str] = dataclasses.field(default_factory=Counter)
    # this run's wall time, whole and in the pool (the rest: loading, golden passes, actors)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def size(self, shard: Shard | Pack) -> int:
        return shard.size(len(self.images[shard.model].indices))

    def packs(self, shards: list[Shard]) -> list[Pack]:
        return make_packs(
            shards, {n: len(i.indices) for n, i in self.images.items()}, self.spec.shard_size
        )

    def golden(self, model: str, pool: Pool) -> pa.Table:
        """``model``'s golden table: as written, or from a worker's golden pass, then written."""
        path = self.store.golden_path(model)
        if self.store.exists(path):
            return self.store.read_columns(path, list(GOLDEN_SCHEMA.names))
        table = pool.golden_table(model)
        self.store.write_table(path, table)
        return table

    def run_round(self, shards: list[Shard], pool: Pool, label: str) -> None:
        """Record the plan so far, then run the packs of this round that have no file yet."""
        self.write("running")
        packs = self.packs(shards)
        pending = [p for p in packs if not self._done(p)]
        total = sum(map(self.size, packs))
        todo = sum(map(self.size, pending))
        log.info(
            "campaign %s%s: %d shards in %d files (%d to run), %d trials",
            self.spec.name,
            label,
            len(shards),
            len(packs),
            len(pending),
            total,
        )
        if pending:
            pool.run(pending, done=total - todo, total=total, label=label)

    def write(self, status: str, targets: list[dict[str, Any]] | None = None) -> None:
        self.store.write_json(self.store.manifest_path, self._manifest(status, targets))

    def _done(self, pack: Pack) -> bool:
        """Whether ``pack``'s file is there and is that pack (its seal and rows match the
        plan); a damaged or foreign file is moved aside, logged, and the pack redone."""
        path = self._path(pack)
        if not self.store.exists(path):
            return False
        problem = self.store.seal_problem(path, pack.seal(len(self.images[pack.model].indices)))
        if problem is None:
            return True
        log.warning(
            "shard %d at %s: %s; moved to %s, redoing it",
            pack.id,
            path,
            problem,
            self.store.move_aside(path),
        )
        return False

    def _path(self, pack: Pack) -> str:
        if pack.census:
            return self.store.census_path(pack.model, pack.kind, pack.shards[0].layer, pack.id)
        return self.store.shard_path(pack.model, pack.kind, pack.id)

    def _manifest(self, status: str, targets: list[dict[str, Any]] | None) -> dict[str, Any]:
        import duckdb
        import pyarrow
        import ray

        return {
            "status": status,
            # sequential sampling: where each model x kind estimate ended, margin met or not
            "targets": targets,
            "fingerprint": self.fingerprint,
            "measured": self.spec.measured(self.checked.model_ids),  # what the fingerprint covers
            "spec": to_dict(self.spec),
            "images": {name: images.indices for name, images in self.images.items()},
            "models": self.facts,
            # range restriction: the bounds and what they were profiled on
            "profile": None if self.profile is None else dataclasses.asdict(self.profile),
            "layout": LAYOUT,
            "plan": {
                "shards": len(self.plan),
                "trials": sum(map(self.size, self.plan)),
                "shard_list": [dataclasses.asdict(s) for s in self.plan],
                # the files: each pack's shard ids (campaign.plan.Pack)
                "packs": [[s.id for s in p.shards] for p in self.packs(self.plan)],
            },
            "nodes": dict(self.nodes),
            "settled_without_forward": dict(self.settled),
            "seconds": self.seconds,
            "versions": {
                "bitstorm": __version__,
                "torch": torch.__version__,
                "ray": ray.__version__,
                "pyarrow": pyarrow.__version__,
                "duckdb": duckdb.__version__,
                "python": platform.python_version(),
            },
        }
