"""Campaign results on disk: the Parquet schemas, atomic shard writers over any pyarrow file
system (a local path or a URI such as ``s3://bucket/prefix``), and the manifest.

Layout (docs/design.md, "Results layout")::

    <out>/<campaign>/manifest.json
    <out>/<campaign>/golden/model=<m>/part-0.parquet
    <out>/<campaign>/trials/model=<m>/kind=<k>/layer=<l>/shard-<id>.parquet
    <out>/<campaign>/census/model=<m>/kind=<k>/layer=<l>/shard-<id>.parquet
    <out>/<campaign>/profile.json  (range-restriction bounds, when the campaign restricts)

``census`` holds the exhaustive last layer as counts, not rows (every weight x bit x image of
a final classifier is tens of millions of trials): one row per format, bit, golden-value range
and whether the faulty unit is the image's golden top-1.

A local file is written under a temporary name starting with ``.`` (which pyarrow datasets and
DuckDB globs skip) and then renamed into place, so a shard exists only once it is complete; on an
object store, where an object appears only once its upload completes, it is serialised in memory
and uploaded to its final name in one go.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bitstorm.atomic import json_bytes
from bitstorm.errors import DataError
from bitstorm.storage import open_location, store_error, upload

# What a trial file stores: nothing another table or a flip can give back (issue 15: bytes per
# trial bound the campaigns a cluster can afford). ``faulty_top1`` and ``top2diff`` are null
# where they equal the image's golden ones (a masked fault), ``value_after`` where it is the
# exact flip of ``value_before`` (float formats, unrestricted); the ``trials`` view
# (campaign.analysis.results) restores them, with ``label`` and ``golden_top1`` from the golden
# table. ``layer`` and ``format`` are columns because one file packs several strata.
TRIAL_SCHEMA = pa.schema(
    [
        ("model", pa.dictionary(pa.int32(), pa.string())),
        ("kind", pa.dictionary(pa.int8(), pa.string())),
        ("layer", pa.dictionary(pa.int32(), pa.string())),
        ("format", pa.dictionary(pa.int8(), pa.string())),
        ("shard", pa.int32()),
        ("index", pa.int64()),
        ("bit", pa.int8()),
        ("image", pa.int32()),
        ("faulty_top1", pa.int32()),
        ("sdc", pa.bool_()),
        ("non_finite", pa.bool_()),
        ("top2diff", pa.float32()),
        ("value_before", pa.float32()),
        ("value_after", pa.float32()),
    ]
)
# Columns with few distinct values per file, dictionary-encoded; the rest are plain + zstd.
DICTIONARY_COLUMNS = ("layer", "format", "shard", "bit")
# Files written by an earlier layout (a file per layer, every column stored) are not read.
LAYOUT = 2

GOLDEN_SCHEMA = pa.schema(
    [
        ("image", pa.int32()),
        ("label", pa.int32()),
        ("golden_top1", pa.int32()),
        ("confidence", pa.float32()),
        ("top2diff", pa.float32()),
    ]
)

CENSUS_SCHEMA = pa.schema(
    [
        ("model", pa.dictionary(pa.int32(), pa.string())),
        ("kind", pa.dictionary(pa.int8(), pa.string())),
        ("layer", pa.dictionary(pa.int32(), pa.string())),
        ("format", pa.string()),
        ("bit", pa.int8()),
        ("value_range", pa.int8()),  # index into VALUE_RANGES, of value_before
        ("top1", pa.bool_()),  # the faulty output unit is the image's golden top-1
        ("trials", pa.int64()),
        ("sdc", pa.int64()),
        ("non_finite", pa.int64()),
        ("shard", pa.int32()),
    ]
)
# The golden value ranges a census counts by: [-inf, -2), [-2, -1), ..., [2, inf).
VALUE_RANGE_EDGES = (-2.0, -1.0, 0.0, 1.0, 2.0)
VALUE_RANGES = ("v < -2", "-2 <= v < -1", "-1 <= v < 0", "0 <= v < 1", "1 <= v < 2", "v >= 2")

# The key of a shard's seal in its Parquet footer.
SEAL_KEY = "bitstorm.shard"
UNSEALED = "no bitstorm seal in its footer"


@dataclass(frozen=True)
class ShardSeal:
    """What a shard file must be: its shard id, its trials and a digest of which trials they
    are (campaign.plan.Shard.seal), and its row count where rows are trials (None for census
    counts). Written into the file's footer by the worker, checked on resume and by readers."""

    shard: int
    trials: int
    digest: str
    rows: int | None = None


# Partition columns live in the path, not in the file (hive partitioning), so readers that
# scan the folder (pyarrow datasets, DuckDB's hive_partitioning) add them back.
PARTITION_COLUMNS = {"trials": ("model", "kind"), "census": ("model", "kind", "layer")}


@dataclass(frozen=True)
class Store:
    """One campaign's folder on a pyarrow file system."""

    filesystem: pafs.FileSystem
    root: str  # the campaign folder, in the file system's own path syntax

    @classmethod
    def open(cls, uri: str, campaign: str, *, create: bool = True) -> Store:
        """``uri`` is a local folder or any URI pyarrow understands (s3://, gs://, file://)."""
        filesystem, path = open_location(uri)
        root = f"{path.rstrip('/')}/{campaign}"
        try:
            if create:
                filesystem.create_dir(root, recursive=True)
            else:  # a bucket or endpoint that is not there fails here, once, not mid-read
                filesystem.get_file_info(root)
        except OSError as error:
            if create:
                raise cannot_write(root, error, filesystem) from None
            raise store_error(f"cannot read {root}", error) from None
        return cls(filesystem, root)

    def shard_path(self, model: str, kind: str, shard: int) -> str:
        """A trial file: the rows of a pack of shards (campaign.plan.Pack), named by its first."""
        return f"{self.root}/trials/model={model}/kind={kind}/shard-{shard:06d}.parquet"

    def census_path(self, model: str, kind: str, layer: str, shard: int) -> str:
        return (
            f"{self.root}/census/model={model}/kind={kind}/layer={layer}/shard-{shard:06d}.parquet"
        )

    def golden_path(self, model: str) -> str:
        return f"{self.root}/golden/model={model}/part-0.parquet"

    @property
    def manifest_path(self) -> str:
        return f"{self.root}/manifest.json"

    @property
    def profile_path(self) -> str:
        return f"{self.root}/profile.json"

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type == pafs.FileType.File

    def write_table(self, path: str, table: pa.Table, seal: ShardSeal | None = None) -> None:
        """Write ``table`` as zstd Parquet, atomically; a shard carries its ``seal`` in the
        file's metadata, so that a reader can tell it is the shard the plan defines."""
        options = {
            "compression": "zstd",
            "use_dictionary": [c for c in table.column_names if c in DICTIONARY_COLUMNS]
            if seal is not None
            else True,
            # the footer is a file's fixed cost: no Arrow schema copy, no min/max statistics
            "store_schema": False,
            "write_statistics": False,
        }

        def write(stream: Any) -> None:
            with pq.ParquetWriter(stream, table.schema, **options) as writer:
                writer.write_table(table)
                if seal is not None:
                    writer.add_key_value_metadata({SEAL_KEY: json.dumps(asdict(seal))})

        self._write_atomically(path, write)

    def seal_problem(self, path: str, expected: ShardSeal) -> str | None:
        """Why the shard file at ``path`` is not the one ``expected`` describes (its footer does
        not read, it has no seal, another shard's seal, or another row count), or None when it
        is. Reads the footer only."""
        try:
            with self.filesystem.open_input_file(path) as stream:
                metadata = pq.read_metadata(stream)
        except (OSError, pa.ArrowException) as error:
            return f"unreadable ({error})"
        raw = (metadata.metadata or {}).get(SEAL_KEY.encode())
        if raw is None:
            return UNSEALED
        try:
            seal = ShardSeal(**json.loads(raw))
        except (TypeError, ValueError):
            return "a damaged seal"
        if seal != expected:
            return f"sealed as {seal}, the plan says {expected}"
        if expected.rows is not None and metadata.num_rows != expected.rows:
            return f"{metadata.num_rows} rows where its seal says {expected.rows}"
        return None

    def read_columns(self, path: str, columns: list[str]) -> pa.Table:
        with self.filesystem.open_input_file(path) as stream:
            return pq.read_table(stream, columns=columns)

    def remove_temporaries(self) -> int:
        """Delete the hidden temporary files a killed writer left (a shard half-written when
        the disk filled or the actor died): readers never see them, but they hold space."""
        try:
            found = self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=True))
        except FileNotFoundError:
            return 0
        stale = [
            info.path
            for info in found
            if info.type == pafs.FileType.File
            and info.base_name.startswith(".")
            and info.base_name.endswith(".tmp")
        ]
        for path in stale:
            self.filesystem.delete_file(path)
        return len(stale)

    def move_aside(self, path: str) -> str:
        """Move a damaged file out of the results, under ``damaged/``, keeping its path."""
        relative = path[len(self.root) + 1 :]
        target = f"{self.root}/damaged/{relative}.{uuid.uuid4().hex[:8]}"
        self.filesystem.create_dir(target.rpartition("/")[0], recursive=True)
        self.filesystem.move(path, target)
        return target

    def write_json(self, path: str, payload: dict[str, Any]) -> None:
        data = json_bytes(payload)
        self._write_atomically(path, lambda stream: stream.write(data))

    def _write_atomically(self, path: str, write: Callable[[Any], object]) -> None:
        """``write`` the file ``path`` whole or not at all: locally to a hidden temporary name
        beside it, then renamed (a failure removes the temporary file); to an object store
        into memory first, then uploaded once (storage.upload)."""
        folder, _, name = path.rpartition("/")
        temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        local = isinstance(self.filesystem, pafs.LocalFileSystem)
        try:
            if local:
                self.filesystem.create_dir(folder, recursive=True)
                _write_durably(temporary, path, write)
                return
            buffer = pa.BufferOutputStream()
            write(buffer)
            upload(self.filesystem, path, buffer.getvalue().to_pybytes())
        except BaseException as error:
            if local and os.path.exists(temporary):
                os.remove(temporary)
            if isinstance(error, OSError):  # read-only, full, gone: the user's to fix
                raise cannot_write(path, error, self.filesystem) from None
            raise

    def read_json(self, path: str) -> dict[str, Any] | None:
        if not self.exists(path):
            return None
        with self.filesystem.open_input_stream(path) as stream:
            try:
                return json.loads(stream.read())
            except json.JSONDecodeError as error:
                raise DataError(f"{path} is corrupt: {error}") from None


def trial_table(
    columns: dict[str, Any], schema: pa.Schema = TRIAL_SCHEMA, folder: str = "trials"
) -> pa.Table:
    """A table of rows in ``schema`` (trials, or census counts) minus the partition columns
    of ``folder`` (which the path holds). ``columns`` maps column names to arrays, lists or
    scalars (broadcast)."""
    names = [f.name for f in schema if f.name not in PARTITION_COLUMNS[folder]]
    length = max((len(v) for v in columns.values() if _is_sequence(v)), default=0)
    arrays = []
    for name in names:
        value = columns[name]
        field = schema.field(name)
        if isinstance(value, pa.Array):  # nullable columns come with their nulls
            arrays.append(value.cast(field.type))
            continue
        values = value if _is_sequence(value) else [value] * length
        arrays.append(pa.array(_as_list(values), type=field.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema([schema.field(n) for n in names]))


def _write_durably(temporary: str, path: str, write: Callable[[Any], object]) -> None:
    """A local file written, fsynced, renamed into place and its folder fsynced, so that after a
    crash the name holds either nothing or the whole file."""
    with open(temporary, "wb") as stream:
        write(stream)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)
    folder = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _is_sequence(value: Any) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, str)


def _as_list(values: Any) -> Any:
    if hasattr(values, "numpy"):  # torch tensors
        return values.detach().cpu().numpy()
    return values


def cannot_write(path: str, error: OSError, filesystem: pafs.FileSystem) -> DataError:
    """A write the output refused (read-only, full, not there; an object store's bucket
    missing or its endpoint not answering), as the user's to fix."""
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return store_error(f"cannot write {path}", error)
    return DataError(
        f"cannot write {path}: {error.strerror or error}; check that the output folder is "
        "writable and has room (finished shards are kept: rerun to go on)"
    )
