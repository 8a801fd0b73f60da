"""``python -m shards stage``: real shard directories copied from a local "remote", file:// and memory://."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest

from shards.manifest import ShardError, load_manifest
from shards.stage import stage

REPO = Path(__file__).resolve().parents[1]


def run_stage_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", "stage", *args, "--quiet"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def remote(digits_shards, tmp_path) -> Path:
    """A private copy of the train split playing the object store (tests may damage it)."""
    src = tmp_path / "remote" / "train"
    shutil.copytree(digits_shards.train, src)
    return src


def test_stage_copies_then_skips_then_replaces_a_corrupted_shard(remote, tmp_path):
    dest = tmp_path / "local" / "train"
    manifest = json.loads((remote / "manifest.json").read_text())
    names = [e["name"] for e in manifest["shards"]]
    assert len(names) >= 3

    first = stage(str(remote), dest, workers=2, progress=False)
    assert (first.copied, first.skipped, first.replaced) == (len(names), 0, 0)
    assert first.bytes_copied == sum(e["bytes"] for e in manifest["shards"])
    assert files_of(dest) == files_of(remote)  # shards, idx files, classes.json, manifest.json, rejected.jsonl
    assert load_manifest(dest)["num_samples"] == manifest["num_samples"]

    stamps = {n: os.stat(dest / n).st_mtime_ns for n in names}
    again = stage(str(remote), dest, progress=False)
    assert (again.copied, again.skipped, again.bytes_copied) == (0, len(names), 0)
    assert {n: os.stat(dest / n).st_mtime_ns for n in names} == stamps  # nothing rewritten

    bad = dest / names[1]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, wrong sha256
    bad.write_bytes(bytes(data))
    (dest / manifest["shards"][2]["index"]).unlink()
    fixed = stage(str(remote), dest, progress=False)
    assert (fixed.copied, fixed.replaced, fixed.skipped) == (1, 1, len(names) - 1)
    assert files_of(dest) == files_of(remote)
    assert os.stat(dest / names[0]).st_mtime_ns == stamps[names[0]]
    assert not [p for p in dest.iterdir() if ".part-" in p.name]


def test_stage_cli_from_a_file_url(remote, tmp_path):
    dest = tmp_path / "local"
    r = run_stage_cli(remote.as_uri(), str(dest))
    assert r.returncode == 0, r.stderr
    n = len(json.loads((remote / "manifest.json").read_text())["shards"])
    assert f"staged {n} shards to {dest}: {n} copied" in r.stdout
    assert files_of(dest) == files_of(remote)
    r = run_stage_cli(remote.as_uri(), str(dest))
    assert r.returncode == 0 and f"{n} already present and valid" in r.stdout, r.stdout + r.stderr


def test_stage_from_memory_url(remote, tmp_path):
    fs = fsspec.filesystem("memory")
    bucket = f"/stage-test-{uuid.uuid4().hex}/train"
    fs.put(str(remote), bucket, recursive=True)
    try:
        dest = tmp_path / "local"
        report = stage(f"memory://{bucket}", dest, progress=False)
        assert report.copied == len(json.loads((remote / "manifest.json").read_text())["shards"])
        assert files_of(dest) == files_of(remote)
        # the source shard is replaced upstream by a corrupt copy: the sha256 check refuses it
        name = json.loads((remote / "manifest.json").read_text())["shards"][0]["name"]
        fs.pipe(f"{bucket}/{name}", b"x" * (remote / name).stat().st_size)
        (dest / name).unlink()
        with pytest.raises(ShardError, match=rf"memory://{bucket}/{name}: sha256 is .* manifest.json says"):
            stage(f"memory://{bucket}", dest, progress=False)
        assert not (dest / name).exists()
        assert not [p for p in dest.iterdir() if ".part-" in p.name]
    finally:
        fs.rm(bucket.rsplit("/", 1)[0], recursive=True)


def test_stage_fails_clearly_on_a_missing_shard_and_writes_nothing(remote, tmp_path):
    name = json.loads((remote / "manifest.json").read_text())["shards"][-1]["name"]
    (remote / name).unlink()
    dest = tmp_path / "local"
    r = run_stage_cli(str(remote), str(dest))
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert err == [f"error: {remote}/{name}: listed in manifest.json but missing from the source; "
                   f"re-upload the split (or rebuild it with `python -m shards build`)"]
    assert not dest.exists()


def test_stage_rejects_a_directory_without_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_stage_cli(str(tmp_path / "empty"), str(tmp_path / "local"))
    assert r.returncode != 0
    assert r.stderr.strip() == (f"error: {tmp_path / 'empty'}/manifest.json: not found; SRC must be a shard "
                                f"directory written by `python -m shards build`")


def test_stage_cleans_temp_files_of_a_dead_stage(remote, tmp_path):
    dest = tmp_path / "local"
    dest.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = dest / f".train-000000.tar.part-{dead}-1"
    stale.write_bytes(b"half a shard")
    stage(str(remote), dest, progress=False)
    assert not stale.exists()


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_stage_names_the_package_for_a_missing_protocol(tmp_path):
    r = run_stage_cli("s3://some-bucket/imagenet/train", str(tmp_path / "local"))
    assert r.returncode != 0
    assert r.stderr.strip().endswith("; pip install s3fs")
    assert not (tmp_path / "local").exists()


def test_source_classes_reads_only_classes_json(remote, digits_shards):
    from shards.manifest import load_classes
    from shards.stage import source_classes

    assert source_classes(remote.as_uri()) == load_classes(digits_shards.train)
    with pytest.raises(ShardError, match=r"/nowhere/classes.json: not found"):
        source_classes(str(remote.parent / "nowhere"))


def _stage_rank(rank: int, init_file: str, src: str, stage_to: str, seen: str) -> None:
    import torch.distributed as dist

    from shards.stage import stage_once_per_node

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        local = stage_once_per_node(stage_to, {"train": src}, local_rank=rank)
        # past the barrier: the node's copy is complete for every rank, not only the one that made it
        Path(seen, f"rank{rank}").write_text(str(load_manifest(local["train"])["num_samples"]))
    finally:
        dist.destroy_process_group()


def test_stage_once_per_node_copies_on_local_rank_0_and_others_wait(remote, tmp_path):
    import torch.multiprocessing as mp

    seen = tmp_path / "seen"
    seen.mkdir()
    mp.spawn(_stage_rank, args=(str(tmp_path / "init"), str(remote), str(tmp_path / "node"), str(seen)),
             nprocs=2, join=True)
    n = json.loads((remote / "manifest.json").read_text())["num_samples"]
    assert {p.name: int(p.read_text()) for p in seen.iterdir()} == {"rank0": n, "rank1": n}
    assert files_of(tmp_path / "node" / "train") == files_of(remote)


def test_trainer_config_takes_a_url_source_only_with_stage_to(tmp_path):
    from trainer.config import build_config

    flags = {"data.train": "s3://bucket/imagenet/train", "data.val": "s3://bucket/imagenet/val",
             "run.out": str(tmp_path / "run")}
    with pytest.raises(ValueError, match="data.train: s3://bucket/imagenet/train is not a directory"):
        build_config(None, None, flags, [])
    cfg = build_config(None, None, {**flags, "data.stage_to": str(tmp_path / "node")}, [])
    assert cfg.data.stage_to == str(tmp_path / "node")


# ---------------------------------------------------------------- DEST that is not ours, a full disk

def stage_main(capsys, *argv) -> tuple[int, list[str]]:
    """``python -m shards stage ...`` in this process: exit code and stderr lines (progress lines dropped)."""
    from shards.__main__ import main

    code = main(["stage", *map(str, argv), "--quiet"])
    return code, [line for line in capsys.readouterr().err.splitlines() if not line.startswith("stage: ")]


def test_stage_refuses_a_dest_that_is_a_file(remote, tmp_path, capsys):
    dest = tmp_path / "notes.txt"
    dest.write_text("mine")
    code, err = stage_main(capsys, remote, dest)
    assert (code, err) == (2, [f"error: {dest}: is a file, not a directory; DEST must be a directory (created if "
                                f"missing)"])
    assert dest.read_text() == "mine"
    code, err = stage_main(capsys, remote, dest / "train")   # a path under a file
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {dest / 'train'}: cannot write "), err


@pytest.mark.parametrize("theirs", ["manifest.json", "classes.json", "notes.txt"])
def test_stage_refuses_a_dest_holding_another_shard_directory(remote, digits_shards, tmp_path, capsys, theirs):
    dest = tmp_path / "someones"
    dest.mkdir()
    if theirs == "notes.txt":
        (dest / theirs).write_text("not a shard")
        expected = (f"error: {dest}: holds 1 file(s) a stage of this split does not write (e.g. 'notes.txt'); stage "
                    f"into an empty directory (or delete DEST if it is an old copy you no longer need)")
    else:
        shutil.copy(digits_shards.val / theirs, dest / theirs)   # the val split's metadata
        if theirs == "classes.json":  # same class names, other bytes: still not SRC's file
            (dest / theirs).write_text((dest / theirs).read_text() + "\n")
        expected = (f"error: {dest / theirs}: DEST holds a different shard directory (its {theirs} is not SRC's); "
                    f"stage into an empty directory (or delete DEST if it is an old copy you no longer need)")
    before = files_of(dest)
    code, err = stage_main(capsys, remote, dest)
    assert (code, err) == (2, [expected])
    assert files_of(dest) == before   # nothing overwritten, nothing added


def test_stage_into_an_earlier_interrupted_stage_of_the_same_source_resumes(remote, tmp_path, capsys):
    dest = tmp_path / "local"
    stage(str(remote), dest, progress=False)
    (dest / "manifest.json").unlink()               # killed before the manifest landed
    (dest / "train-000001.tar").unlink()
    code, err = stage_main(capsys, remote, dest)
    assert (code, err) == (0, [])
    assert files_of(dest) == files_of(remote)


def test_a_manifest_shard_that_is_a_directory_in_the_source_is_one_line(remote, tmp_path, capsys):
    (remote / "train-000002.tar").unlink()
    (remote / "train-000002.tar").mkdir()
    code, err = stage_main(capsys, remote, tmp_path / "local")
    assert (code, err) == (2, [f"error: {remote}/train-000002.tar: listed in manifest.json as a file but is a "
                                f"directory; re-upload the split (or rebuild it with `python -m shards build`)"])
    assert not (tmp_path / "local").exists()


STAGE_ON_SMALL_DISK = """
set -u
mount -t tmpfs -o size=3m tmpfs "$DISK" || exit 97
python -m shards stage "$SRC" "$DISK/train" --quiet --workers 1 >"$OUT/first.out" 2>"$OUT/first.err"
echo $? >"$OUT/first.rc"
ls -a "$DISK/train" >"$OUT/after_first.ls"
mount -o remount,size=64m "$DISK"
python -m shards stage "$SRC" "$DISK/train" --quiet --workers 1 >"$OUT/second.out" 2>"$OUT/second.err"
echo $? >"$OUT/second.rc"
cp -r "$DISK/train" "$OUT/staged"
"""


def test_stage_on_a_full_disk_fails_in_one_line_and_the_rerun_resumes(remote, tmp_path):
    """A real full disk: a 3 MB tmpfs (in a user+mount namespace, so no root is needed) under a 6.6 MB split."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir(), out.mkdir()
    env = {**os.environ, "DISK": str(disk), "SRC": str(remote), "OUT": str(out),
           "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", STAGE_ON_SMALL_DISK], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not (out / "second.rc").exists():
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {r.stderr.strip()[:200]}")
    n = len(json.loads((remote / "manifest.json").read_text())["shards"])
    assert (out / "first.rc").read_text().strip() == "2"
    assert [line for line in (out / "first.err").read_text().splitlines() if not line.startswith("stage: ")] == [
        f"error: {disk}/train: no space left on the device (No space left on device); free some (or choose "
        f"another DEST) and rerun: the shards already copied are kept and checked, not copied again"]
    left = (out / "after_first.ls").read_text().split()
    assert "manifest.json" not in left and not [p for p in left if ".part-" in p]   # nothing half-written
    kept = [p for p in left if p.endswith(".tar")]
    assert 0 < len(kept) < n
    assert (out / "second.rc").read_text().strip() == "0", (out / "second.err").read_text()
    assert f"{n - len(kept)} copied" in (out / "second.out").read_text()
    assert f"{len(kept)} already present and valid" in (out / "second.out").read_text()
    assert files_of(out / "staged") == files_of(remote)
