"""Where results and checkpoints live: a local folder or an object store URI (``s3://bucket/prefix``,
``gs://bucket/prefix``), opened with pyarrow, for the campaign store, Ray Train and the report.

The endpoint and the credentials come from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ... as pyarrow and the AWS SDK read them) and
never from a spec, so that no secret is written into a spec, a manifest or a log. A file system
opened here pickles its endpoint but not the credentials (pyarrow resolves those where it is
used), so Ray actors and Ray Train workers get the driver's endpoint and their own credentials.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from bitstorm.atomic import write_bytes_atomic
from bitstorm.errors import ConfigError, DataError


def is_uri(location: str) -> bool:
    """Whether ``location`` names a file system by scheme (``s3://``) rather than a local path."""
    return "://" in location


def absolute(location: str) -> str:
    """A local path made absolute (Ray Train and workers in other folders need one); a URI as
    it is (``Path.resolve`` would turn ``s3://bucket/runs`` into a local folder)."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """``location/part/...``, keeping a URI's query (``?endpoint_override=...``) at the end."""
    base, mark, query = location.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """The file system of ``location`` and the path on it; a local folder when it has no
    scheme. Opening connects to nothing: errors come with the first read or write."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, ValueError) as error:
        raise ConfigError(
            f"{location!r}: pyarrow opens no file system for it ({error}); use a local folder "
            "or a URI such as s3://bucket/prefix or gs://bucket/prefix"
        ) from None


def uri_of(filesystem: pafs.FileSystem, path: str) -> str:
    """A path of ``filesystem`` as a user names it: a local path, or a URI (pyarrow and Ray
    hold an object store's paths without the scheme)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    return f"{filesystem.type_name}://{path}"


def ray_storage(location: str) -> dict[str, object]:
    """``RunConfig`` arguments that put a Ray Train or Tune run under ``location``: a file
    system opened here, so the controller and the workers use this process's endpoint."""
    if not is_uri(location):
        return {"storage_path": absolute(location)}
    filesystem, path = open_location(location)
    return {"storage_path": path, "storage_filesystem": filesystem}


def store_error(where: str, error: OSError) -> DataError:
    """An object store that refused a request or did not answer, as the user's to fix (one
    line: the AWS SDK's messages span several)."""
    return DataError(
        f"{where}: {' '.join(str(error).split())}; check the bucket exists and that the endpoint "
        "(AWS_ENDPOINT_URL) and credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) in the "
        "environment are right"
    )


def write_bytes(location: str, data: bytes) -> None:
    """Write ``data`` to the file ``location``, whole or not at all: locally through a
    temporary file and a rename; to an object store as one upload (an object appears only
    once its upload completes)."""
    if not is_uri(location):
        write_bytes_atomic(location, data)
        return
    filesystem, path = open_location(location)
    try:
        upload(filesystem, path, data)
    except OSError as error:
        raise store_error(location, error) from None


def upload(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """``data`` as the object ``path``, in one upload: readers see the old object or the new
    one, never part of it, and a failed upload leaves no object (no temporary to clean up)."""
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)
