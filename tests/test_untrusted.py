"""Untrusted files: a checkpoint that carries pickled code is refused; tar members that would escape are rejected."""
from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.imagenet_like import jpeg_bytes
from trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


class TouchesAFile:
    """Unpickling this calls pathlib.Path.touch(marker): what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def evil_checkpoint(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "best.pt"
    torch.save({"model": {"fc8.bias": torch.zeros(10)}, "meta": {"classes": [str(i) for i in range(10)],
                                                                  "width": 0.25, "image_size": 64},
                "payload": TouchesAFile(marker)}, path)
    return path, marker


def test_the_evil_checkpoint_really_runs_code_when_loaded_without_weights_only(evil_checkpoint):
    path, marker = evil_checkpoint
    torch.load(path, weights_only=False)   # what the project never does
    assert marker.exists()


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_cli_refuses_a_checkpoint_with_pickled_objects_and_runs_none_of_it(evil_checkpoint, digits_shards, command):
    path, marker = evil_checkpoint
    image = next((digits_shards.raw / "val").rglob("*.jpg"))
    args = [str(image)] if command == "predict" else ["--data", str(digits_shards.val)]
    out = subprocess.run([sys.executable, "-m", "trainer", command, "--checkpoint", str(path), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: refused, it holds pickled Python objects (Unsupported global: GLOBAL getattr was not an "
        f"allowed global by default); checkpoints are loaded with weights_only=True and never run pickled code: "
        f"use a file written by `python -m trainer fit`"]
    assert out.stdout == "" and not marker.exists()


def test_a_training_state_in_a_ray_checkpoint_directory_is_loaded_weights_only(evil_checkpoint, tmp_path):
    """fit restores Ray Train checkpoints through the same ckpt.load (a directory means its checkpoint.pt)."""
    path, marker = evil_checkpoint
    directory = tmp_path / "checkpoint_000001"
    directory.mkdir()
    path.rename(directory / ckpt.TRAINING_STATE)
    with pytest.raises(ValueError, match="refused, it holds pickled Python objects"):
        ckpt.load(directory)
    assert not marker.exists()


# ---------------------------------------------------------------- the raw ImageNet tar

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _class_tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return buffer.getvalue()


@pytest.fixture
def hostile_train_tar(tmp_path):
    """An ILSVRC-style tar of per-class tars with names that point outside: in the outer and an inner tar."""
    rng = np.random.default_rng(0)
    jpeg = lambda: jpeg_bytes(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))  # noqa: E731
    path = tmp_path / "src" / "ILSVRC2012_img_train.tar"
    path.parent.mkdir()
    good = {f"n01440764_{i}.JPEG": jpeg() for i in range(3)}
    with tarfile.open(path, "w") as outer:
        _add(outer, "n01440764.tar", _class_tar({**good, "../../escape.JPEG": jpeg(), "/tmp/abs.JPEG": jpeg()}))
        _add(outer, "n01443537.tar", _class_tar({f"n01443537_{i}.JPEG": jpeg() for i in range(3)}))
        _add(outer, "../n09999999.tar", _class_tar({"n09999999_0.JPEG": jpeg()}))
        _add(outer, "/abs/n09999998.tar", _class_tar({"n09999998_0.JPEG": jpeg()}))
    return path


def _shards_build(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", "build", *map(str, args), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_tar_members_with_absolute_or_parent_paths_are_rejected_and_never_written(hostile_train_tar, tmp_path):
    out = tmp_path / "out" / "train"
    result = _shards_build(hostile_train_tar, out, "--split", "train")
    assert result.returncode == 0, result.stderr
    rejected = {json.loads(line)["path"]: json.loads(line)["reason"]
                for line in (out / "rejected.jsonl").read_text().splitlines()}
    assert rejected == {
        "n01440764/../../escape.JPEG": "unsafe tar member path (contains '..'): ../../escape.JPEG",
        "n01440764//tmp/abs.JPEG": "unsafe tar member path (absolute): /tmp/abs.JPEG",
        "../n09999999.tar": "unsafe tar member path (contains '..'): ../n09999999.tar",
        "/abs/n09999998.tar": "unsafe tar member path (absolute): /abs/n09999998.tar",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["n01440764", "n01443537"] and manifest["num_samples"] == 6
    # the sharder streams members into shards: no member became a file anywhere
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert not written & {"escape.JPEG", "abs.JPEG", "n09999999.tar", "n09999998.tar"}
    assert not Path("/tmp/abs.JPEG").exists()


def test_strict_build_stops_at_an_unsafe_member_and_leaves_no_manifest(hostile_train_tar, tmp_path):
    out = tmp_path / "strict" / "train"
    result = _shards_build(hostile_train_tar, out, "--split", "train", "--strict")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unsafe tar member path" in lines[0], result.stderr
    assert not (out / "manifest.json").exists()
