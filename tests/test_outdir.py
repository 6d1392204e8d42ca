"""outdir's file helpers: an atomic write that fails leaves the old file, JSON Lines errors name file and line."""

from __future__ import annotations

import json

import pytest

from outdir import read_jsonl, write_atomic, write_json


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def half_then_crash(tmp):
        tmp.write_text('{"a": 2, "b"')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_atomic(target, half_then_crash)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]   # no temporary file left behind
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)   # not mkstemp's private mode


def test_read_jsonl_names_the_file_and_line_or_skips_cut_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo\n')
    with pytest.raises(ValueError, match=r"log.jsonl line 4: not valid JSON"):
        read_jsonl(path)
    assert read_jsonl(path, skip_bad=True) == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "none.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "none.jsonl")
    path.write_bytes(b'{"a": 1}\n\xff\n')
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        read_jsonl(path)
