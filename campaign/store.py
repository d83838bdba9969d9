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

A file is written under a temporary name starting with ``.`` (which pyarrow datasets and DuckDB
globs skip) and then moved into place, so a shard exists only once it is complete.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bitstorm.atomic import json_bytes
from bitstorm.errors import DataError

TRIAL_SCHEMA = pa.schema(
    [
        ("model", pa.dictionary(pa.int32(), pa.string())),
        ("kind", pa.dictionary(pa.int8(), pa.string())),
        ("layer", pa.dictionary(pa.int32(), pa.string())),
        ("index", pa.int64()),
        ("bit", pa.int8()),
        ("format", pa.dictionary(pa.int8(), pa.string())),
        ("image", pa.int32()),
        ("label", pa.int32()),
        ("golden_top1", pa.int32()),
        ("faulty_top1", pa.int32()),
        ("sdc", pa.bool_()),
        ("non_finite", pa.bool_()),
        ("top2diff", pa.float32()),
        ("value_before", pa.float32()),
        ("value_after", pa.float32()),
        ("shard", pa.int32()),
    ]
)

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

# Partition columns live in the path, not in the file (hive partitioning), so readers that
# scan the folder (pyarrow datasets, DuckDB's hive_partitioning) add them back.
PARTITION_COLUMNS = ("model", "kind", "layer")


@dataclass(frozen=True)
class Store:
    """One campaign's folder on a pyarrow file system."""

    filesystem: pafs.FileSystem
    root: str  # the campaign folder, in the file system's own path syntax

    @classmethod
    def open(cls, uri: str, campaign: str, *, create: bool = True) -> Store:
        """``uri`` is a local folder or any URI pyarrow understands (s3://, gs://, file://)."""
        try:
            filesystem, path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, ValueError):
            filesystem, path = pafs.LocalFileSystem(), _absolute_local(uri)
        root = f"{path.rstrip('/')}/{campaign}"
        if create:
            filesystem.create_dir(root, recursive=True)
        return cls(filesystem, root)

    def shard_path(self, model: str, kind: str, layer: str, shard: int) -> str:
        return (
            f"{self.root}/trials/model={model}/kind={kind}/layer={layer}/shard-{shard:06d}.parquet"
        )

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

    def write_table(self, path: str, table: pa.Table) -> None:
        """Write ``table`` as zstd Parquet, atomically."""
        self._write_atomically(
            path,
            lambda stream: pq.write_table(table, stream, compression="zstd", use_dictionary=True),
        )

    def write_json(self, path: str, payload: dict[str, Any]) -> None:
        data = json_bytes(payload)
        self._write_atomically(path, lambda stream: stream.write(data))

    def _write_atomically(self, path: str, write: Callable[[Any], object]) -> None:
        """``write`` to a hidden temporary name beside ``path``, then move it into place; a
        failure removes the temporary file, so nothing half-written is left under any name."""
        folder, _, name = path.rpartition("/")
        self.filesystem.create_dir(folder, recursive=True)
        temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            with self.filesystem.open_output_stream(temporary) as stream:
                write(stream)
            self.filesystem.move(temporary, path)
        except BaseException:
            if self.filesystem.get_file_info(temporary).type == pafs.FileType.File:
                self.filesystem.delete_file(temporary)
            raise

    def read_json(self, path: str) -> dict[str, Any] | None:
        if not self.exists(path):
            return None
        with self.filesystem.open_input_stream(path) as stream:
            try:
                return json.loads(stream.read())
            except json.JSONDecodeError as error:
                raise DataError(f"{path} is corrupt: {error}") from None


def trial_table(columns: dict[str, Any], schema: pa.Schema = TRIAL_SCHEMA) -> pa.Table:
    """A table of rows in ``schema`` (trials, or census counts) minus the partition columns
    (which the path holds). ``columns`` maps column names to arrays, lists or scalars
    (broadcast)."""
    names = [f.name for f in schema if f.name not in PARTITION_COLUMNS]
    length = max((len(v) for v in columns.values() if _is_sequence(v)), default=0)
    arrays = []
    for name in names:
        value = columns[name]
        field = schema.field(name)
        values = value if _is_sequence(value) else [value] * length
        arrays.append(pa.array(_as_list(values), type=field.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema([schema.field(n) for n in names]))


def _is_sequence(value: Any) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, str)


def _as_list(values: Any) -> Any:
    if hasattr(values, "numpy"):  # torch tensors
        return values.detach().cpu().numpy()
    return values


def _absolute_local(path: str) -> str:
    from pathlib import Path

    return str(Path(path).expanduser().resolve())
