"""Atomic writes leave either the old file or the new one, never a partial one."""

import json

import pytest

from bitstorm.atomic import write_bytes_atomic, write_json_atomic


def test_json_round_trip_and_no_leftovers(tmp_path):
    path = write_json_atomic(tmp_path / "deep" / "result.json", {"b": 2, "a": [1.5]})
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 2}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_bytes_atomic(tmp_path / "out.bin", b"old")

    with pytest.raises(TypeError):  # fails mid-write, after the temporary file was created
        write_bytes_atomic(path, object())  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_files_get_the_permissions_a_plain_open_would_give(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = write_bytes_atomic(tmp_path / "atomic.txt", b"x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_writes_leave_the_process_umask_alone(tmp_path, monkeypatch):
    """The umask is read once, at import: setting it per write would race other threads."""

    def no_umask(_mask):
        raise AssertionError("os.umask called during a write")

    monkeypatch.setattr("os.umask", no_umask)
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    write_bytes_atomic(tmp_path / "b.bin", b"b")
