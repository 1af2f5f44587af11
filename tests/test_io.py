"""repinf_lens._io: atomic writes (a failure keeps the old file, no temporary file left), the JSON cache, as_rows."""

from __future__ import annotations

import json
import os

import pytest

from repinf_lens import _cache, _io, _shards
from repinf_lens.influence import attributor


def _usual_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def test_writers_replace_the_file_and_leave_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    _io.write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and path.stat().st_mode & 0o777 == _usual_mode()
    _io.write_text_atomic(path, "a\r\nb")
    assert path.read_bytes() == b"a\r\nb"  # no newline translation
    _io.write_json_atomic(path, {"x": (1, 2), "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": [1, 2], "p": str(tmp_path)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


def test_atomic_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), _io.atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]
    with _io.atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == _usual_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_cached_json_recomputes_only_for_another_key(tmp_path):
    path = tmp_path / "rec.json"
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    assert _io.cached_json(path, {"ids": ("a", "b")}, compute) == {"key": {"ids": ["a", "b"]}, "value": 1}
    assert _io.cached_json(path, {"ids": ["a", "b"]}, compute)["value"] == 1  # tuple == list after JSON
    assert _io.cached_json(path, {"ids": ["a"]}, compute)["value"] == 2
    assert len(calls) == 2


def test_as_rows_containers_and_empty():
    rows = [{"id": "a", "x": 1}, {"id": "b", "x": 2}]
    assert _io.as_rows(rows) == rows
    assert _io.as_rows({"id": ["a", "b"], "x": [1, 2]}) == rows
    assert _io.as_rows(rows[0]) == [rows[0]]
    assert _io.as_rows([]) == []
    with pytest.raises(ValueError, match="The query set is empty"):
        _io.as_rows([], "query set")
    with pytest.raises(ValueError, match="The dataset is empty"):
        attributor.as_rows([])  # the attributor's name keeps its default


def test_old_homes_reexport_the_same_functions():
    assert _shards.write_json_atomic is _io.write_json_atomic
    assert _shards.write_text_atomic is _io.write_text_atomic
    assert _cache.atomic_dir is _io.atomic_dir
