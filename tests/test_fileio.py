"""shards.fileio: the one atomic write and the one sha256 every stage uses."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from shards.fileio import atomic_write, remove_stale_temps, sha256_file, temp_path, write_bytes, write_text


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old\n")
    with atomic_write(path, "w") as f:
        f.write("new ")
        assert path.read_text() == "old\n"          # readers see the old file until the block ends
        f.write("text\n")
    assert path.read_text() == "new text\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_an_error_inside_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "last.pt"
    write_bytes(path, b"good")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_new_file_is_not_created_on_error(tmp_path):
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "x.bin") as f:
            f.write(b"1")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_temp_names_are_hidden_unique_and_carry_the_pid(tmp_path):
    a, b = temp_path(tmp_path / "best.pt"), temp_path(tmp_path / "best.pt")
    assert a != b and a.parent == tmp_path
    assert a.name.startswith(".best.pt.part-") and a.name.endswith(".tmp")
    assert a.name.split(".part-")[1].split("-")[0] == str(os.getpid())


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()   # a pid that has exited
    stale = tmp_path / f".train-000000.tar.part-{dead}-1a2b.tmp"
    stale.write_bytes(b"half a shard")
    live = temp_path(tmp_path / "train-000001.tar")   # this process: alive
    live.write_bytes(b"being written")
    write_text(tmp_path / "classes.json", "{}")
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "classes.json"])


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path):
    data = bytes(range(256)) * 4099                  # not a multiple of the chunk size
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_mode_is_bytes_or_text_only(tmp_path):
    with pytest.raises(ValueError, match="atomic_write mode='a'"):
        with atomic_write(tmp_path / "log", "a"):
            pass
