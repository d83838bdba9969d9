"""A finished (or running) campaign as DuckDB views: ``trials`` and ``golden`` over the Parquet
files of any pyarrow file system (a local folder or a URI such as ``s3://bucket/prefix/name``),
with the hive partition columns (model, kind, layer) restored from the paths.

    >>> results = open_results("bitstorm-default/campaigns/digits_bitstorm")
    >>> results.sql("select model, kind, avg(sdc::int) from trials group by all").df()

Only the files the store writes for the manifest's plan are read: writers use hidden temporary
names, and a stray file, a renamed copy or a shard of another plan is never counted.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from bitstorm.errors import DataError
from campaign.analysis.stats import Rate, shrunk_rates, stratified_estimate
from campaign.store import (
    CENSUS_SCHEMA,
    GOLDEN_SCHEMA,
    LAYOUT,
    PARTITION_COLUMNS,
    TRIAL_SCHEMA,
    Store,
)

if TYPE_CHECKING:
    import pandas

# How a rate over several layers weights its strata (:func:`weights`).
OVERALLS = ("fault_space", "layer_mean")
T = TypeVar("T")
K = TypeVar("K")


@dataclass(frozen=True)
class StratumCounts:
    """Trials and SDCs of one stratum, with the stratum's size in the fault space
    (sites x images: every (site, image) pair at this bit is one possible trial)."""

    model: str
    kind: str
    layer: str
    fmt: str
    bit: int
    trials: int
    sdc: int
    population: int
    census: bool = False  # run exhaustively: every (site, image) at this bit exactly once


@dataclass
class Results:
    store: Store
    manifest: dict[str, Any]
    connection: duckdb.DuckDBPyConnection

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """Run SQL over the views ``trials``, ``golden`` and ``census`` (the exhaustive last
        layer's counts); returns a lazy relation
        (``.df()``, ``.arrow()``, ``.fetchall()``)."""
        return self.connection.sql(query)

    def df(self, query: str) -> pandas.DataFrame:
        return self.sql(query).df()

    def images(self, model: str) -> int:
        """Campaign images of ``model`` (manifests before per-model images list one set)."""
        images = self.manifest.get("images", [])
        return len(images.get(model, []) if isinstance(images, dict) else images)

    @property
    def overall(self) -> str:
        """The campaign's definition of an "overall" rate (campaign.spec.OVERALLS)."""
        return self.manifest.get("spec", {}).get("overall") or "fault_space"

    def sites(self) -> dict[tuple[str, str, str, str], int]:
        """Sites per (model, kind, layer, format) from the plan: per image for neurons."""
        return {
            (s["model"], s["kind"], s["layer"], s["fmt"]): int(s["sites"])
            for s in self.manifest.get("plan", {}).get("shard_list", [])
        }

    def strata(self, where: str = "true") -> list[StratumCounts]:
        """Counts per stratum (model x kind x layer x format x bit) of the trials that match
        the SQL condition ``where``."""
        sites = self.sites()
        exhaustive = {
            (s["model"], s["kind"], s["layer"], s["fmt"])
            for s in self.manifest.get("plan", {}).get("shard_list", [])
            if not s.get("counts")
        }
        rows = self.sql(
            "select model, kind, layer, format, bit, sum(n), sum(k) from ("
            f"select model, kind, layer, format, bit, count(*) as n, sum(sdc::int) as k "
            f"from trials where {where} group by all union all "
            "select model, kind, layer, format, bit, sum(trials), sum(sdc) "
            f"from census where {where} group by all) group by all order by all"
        ).fetchall()
        strata = []
        for model, kind, layer, fmt, bit, trials, sdc in rows:
            population = sites[model, kind, layer, fmt] * max(1, self.images(model))
            census = (model, kind, layer, fmt) in exhaustive and trials >= population
            strata.append(
                StratumCounts(
                    model, kind, layer, fmt, int(bit), int(trials), int(sdc), population, census
                )
            )
        return strata


def open_results(location: str | os.PathLike[str], campaign: str | None = None) -> Results:
    """Open the campaign folder ``location`` (a path or a URI, or ``location/campaign``)
    read-only."""
    location = os.fspath(location)
    if campaign is None:
        location, _, campaign = location.rstrip("/").rpartition("/")
        location = location or "."
    return results_of(Store.open(location, campaign, create=False))


def results_of(store: Store) -> Results:
    """The campaign in ``store`` as it is on disk now (files written later are not seen: open
    it again for those)."""
    manifest = store.read_json(store.manifest_path)
    if manifest is None:
        raise DataError(f"{store.root} is not a campaign folder (it has no manifest.json)")
    if manifest.get("layout") != LAYOUT:
        raise DataError(
            f"{store.root} was written in an earlier bitstorm's file layout; rerun its campaign "
            "with --fresh to read it with this one"
        )
    connection = duckdb.connect()
    planned = _planned_files(store, manifest)
    for folder, schema in (("trials", TRIAL_SCHEMA), ("census", CENSUS_SCHEMA)):
        partitions = PARTITION_COLUMNS[folder]
        dataset = _dataset(store, folder, schema, partitions, planned[folder].__contains__)
        connection.register(f"stored_{folder}", dataset)
    golden = _dataset(store, "golden", GOLDEN_SCHEMA, ("model",), _GOLDEN_NAME.fullmatch)
    connection.register("golden", golden)
    connection.execute("create view census as select * from stored_census")
    connection.create_function(
        "bitstorm_flip", _flip, ["FLOAT", "TINYINT", "VARCHAR"], "FLOAT", type="arrow"
    )
    connection.execute(TRIALS_VIEW)
    return Results(store, manifest, connection)


# The ``trials`` view: every column of a trial, with what the files leave out (campaign.store's
# TRIAL_SCHEMA) restored: the golden label and top-1 from the golden table, the faulty top-1
# and Top2Diff where a masked fault left them golden, the value after where it is the flip.
TRIALS_VIEW = """
create view trials as
select t.model, t.kind, t.layer, t.index, t.bit, t.format, t.image,
       g.label, g.golden_top1,
       coalesce(t.faulty_top1, g.golden_top1) as faulty_top1,
       t.sdc, t.non_finite,
       coalesce(t.top2diff, g.top2diff) as top2diff,
       t.value_before,
       coalesce(t.value_after, bitstorm_flip(t.value_before, t.bit, t.format)) as value_after,
       t.shard
from stored_trials t left join golden g on g.model = t.model and g.image = t.image
"""

_GOLDEN_NAME = re.compile(r"model=[^/]+/part-0\.parquet")


def _flip(values: pa.Array, bits: pa.Array, formats: pa.Array) -> pa.Array:
    """Bit ``bits`` of each value flipped as its float format stores it (fp32, fp16, bf16:
    the worker stores only values that differ from this); null for int8, whose values after
    are always stored."""
    value = values.to_numpy(zero_copy_only=False).astype(np.float32)
    bit = bits.to_numpy(zero_copy_only=False).astype(np.uint32)
    fmt = np.asarray(formats.to_pylist(), dtype=object)
    out = np.full(len(value), np.nan, dtype=np.float32)
    one = np.uint32(1)
    for name, flipped in (
        ("fp32", lambda v, b: (v.view(np.uint32) ^ (one << b)).view(np.float32)),
        ("bf16", lambda v, b: (v.view(np.uint32) ^ (one << (b + 16))).view(np.float32)),
        (
            "fp16",
            lambda v, b: (
                (v.astype(np.float16).view(np.uint16) ^ (one << b).astype(np.uint16))
                .view(np.float16)
                .astype(np.float32)
            ),
        ),
    ):
        where = fmt == name
        if where.any():
            out[where] = flipped(value[where], bit[where])
    return pa.array(out, mask=~np.isin(fmt, ("fp32", "bf16", "fp16")))


def _planned_files(store: Store, manifest: dict[str, Any]) -> dict[str, set[str]]:
    """The files the store writes for the manifest's plan, by folder, relative to it: the only
    ones a reader reads (a copy named ``shard-000088 (1).parquet``, a stray file or a shard of
    another plan is never counted)."""
    plan = manifest.get("plan", {})
    shards = {shard["id"]: shard for shard in plan.get("shard_list", [])}
    files: dict[str, set[str]] = {"trials": set(), "census": set()}
    for ids in plan.get("packs", []):
        first = shards[ids[0]]
        if first.get("census"):
            path = store.census_path(first["model"], first["kind"], first["layer"], first["id"])
            folder = "census"
        else:
            path = store.shard_path(first["model"], first["kind"], first["id"])
            folder = "trials"
        files[folder].add(path[len(f"{store.root}/{folder}/") :])
    return files


def group_by(items: Iterable[T], key: Callable[[T], K]) -> dict[K, list[T]]:
    """``items`` grouped by ``key``, groups and items in first-seen order."""
    groups: dict[K, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def by_estimate(strata: Iterable[StratumCounts]) -> dict[tuple[str, str], list[StratumCounts]]:
    """Strata grouped by reported estimate: one SDC rate per (model, kind)."""
    return dict(sorted(group_by(strata, lambda s: (s.model, s.kind)).items()))


def weights(strata: Sequence[StratumCounts], overall: str = "fault_space") -> list[float]:
    """Each stratum's weight in a rate over ``strata``: ``fault_space``, its share of the fault
    space (every possible trial counts once); ``layer_mean``, every layer alike and the strata
    of a layer by their share of it (goldeneye's "overall": equal injections per layer, so the
    mean of the per-layer rates)."""
    if overall == "fault_space":
        return [float(s.population) for s in strata]
    layer_size: Counter[tuple[str, str, str]] = Counter()
    for s in strata:
        layer_size[s.model, s.kind, s.layer] += s.population
    return [s.population / layer_size[s.model, s.kind, s.layer] / len(layer_size) for s in strata]


def counts(
    strata: Sequence[StratumCounts], overall: str = "fault_space"
) -> tuple[list[int], list[int], list[float]]:
    """(successes, trials, weight) columns, as campaign.analysis.stats takes them (its
    ``population``: only the strata's relative weights matter there)."""
    return [s.sdc for s in strata], [s.trials for s in strata], weights(strata, overall)


def bit_pools(strata: Sequence[StratumCounts]) -> list[tuple[str, str, str, int]]:
    """A pool label per stratum: one bit position of one format across the layers of a model
    and kind (see campaign.analysis.stats.shrunk_rates)."""
    return [(s.model, s.kind, s.fmt, s.bit) for s in strata]


def variance_rates(context: Sequence[StratumCounts]) -> dict[StratumCounts, float]:
    """Each stratum's p for the variance, shrunk with its bit pool over ``context``."""
    successes, trials, _ = counts(context)
    shrunk = shrunk_rates(successes, trials, bit_pools(context))
    return dict(zip(context, shrunk.tolist(), strict=True))


def estimate(
    strata: Sequence[StratumCounts],
    confidence: float = 0.95,
    rates: Mapping[StratumCounts, float] | None = None,
    overall: str = "fault_space",
) -> Rate:
    """The stratified estimate over ``strata`` weighted as ``overall`` says (:func:`weights`),
    with the shrinkage pooled by bit position: ``rates`` from :func:`variance_rates` over a
    larger context (a layer's rate takes the model's other layers: they are the evidence that a
    bit never corrupts anything), else over ``strata`` themselves."""
    rates = variance_rates(strata) if rates is None else rates
    return stratified_estimate(
        *counts(strata, overall),
        confidence=confidence,
        variance_rates=[rates[s] for s in strata],
        census=[s.census for s in strata],
    )


def overall_rates(
    results: Results, confidence: float = 0.95, overall: str | None = None
) -> dict[tuple[str, str], Rate]:
    """The SDC rate of each model and kind over all its trials, by (model, kind), weighted as
    ``overall`` says (default: the campaign's own definition), with an interval at
    ``confidence``."""
    overall = overall or results.overall
    return {
        key: estimate(members, confidence, overall=overall)
        for key, members in by_estimate(results.strata()).items()
    }


def _dataset(
    store: Store,
    folder: str,
    schema: pa.Schema,
    partitions: tuple[str, ...],
    wanted: Callable[[str], object],
) -> ds.Dataset:
    """The Parquet files under ``folder`` whose path relative to it is ``wanted``, with the
    partition columns (strings) taken from the paths; an empty table of the same columns when
    there are none yet."""
    partitioning = ds.partitioning(pa.schema([(c, pa.string()) for c in partitions]), flavor="hive")
    path = f"{store.root}/{folder}"
    columns = [pa.field(c, pa.string()) for c in partitions]
    columns += [f for f in schema if f.name not in partitions]
    empty = ds.dataset(pa.schema(columns).empty_table())
    if store.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return empty
    found = store.filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [
        info.path
        for info in found
        if info.type == pafs.FileType.File and wanted(info.path[len(path) + 1 :])
    ]
    if not files:
        return empty
    return ds.dataset(
        sorted(files),
        filesystem=store.filesystem,
        format="parquet",
        partitioning=partitioning,
        partition_base_dir=path,
    )
