"""Build ImageNet-style sharder inputs for tests from real photographs (no network).

The good images are crops of the photographs that ship with scikit-image / scikit-learn
(``shards.sample_data.photo_crops``) under real ILSVRC-2012 wnids. The awkward cases ImageNet really
has are made here from the same photographs: CMYK and greyscale JPEGs, a PNG named ``.JPEG``, plus
files no image reader accepts (truncated, zero-byte, text).
"""
from __future__ import annotations

import csv
import io
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image



@dataclass
class Tree:
    """A class-folder tree and what the sharder should make of it."""
    root: Path
    good: dict[str, str] = field(default_factory=dict)       # relative file -> wnid (should become samples)
    bad: dict[str, str] = field(default_factory=dict)        # relative file -> which awkward case (rejects)
    reencoded: set[str] = field(default_factory=set)         # good files that are not RGB JPEG as stored

    @property
    def wnids(self) -> list[str]:
        return sorted(set(self.good.values()))


def jpeg_bytes(pixels: np.ndarray, mode: str = "RGB", quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_class_tree(root: Path, crops: list[tuple[str, np.ndarray]], awkward: bool = True) -> Tree:
    """``root/<wnid>/<wnid>_<n>.JPEG`` for every crop; with ``awkward`` add ImageNet's problem files."""
    tree = Tree(Path(root))
    counters: dict[str, int] = {}
    for wnid, pixels in crops:
        n = counters[wnid] = counters.get(wnid, 0) + 1
        rel = f"{wnid}/{wnid}_{n}.JPEG"
        (tree.root / wnid).mkdir(parents=True, exist_ok=True)
        (tree.root / rel).write_bytes(jpeg_bytes(pixels))
        tree.good[rel] = wnid
    if awkward:
        wnid, pixels = crops[0]
        other = crops[-1][1]
        odd = {
            "cmyk": jpeg_bytes(pixels, "CMYK"),
            "grey": jpeg_bytes(other, "L"),
        }
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        odd["png"] = png.getvalue()
        for kind, data in odd.items():
            rel = f"{wnid}/{wnid}_{kind}.JPEG"
            (tree.root / rel).write_bytes(data)
            tree.good[rel] = wnid
            tree.reencoded.add(rel)
        full = jpeg_bytes(other)
        bad = {"truncated": full[: len(full) // 2], "zero_byte": b"",
               "text": b"Not an image: a note a crawler saved with a .JPEG name.\n"}
        for kind, data in bad.items():
            rel = f"{wnid}/{wnid}_{kind}.JPEG"
            (tree.root / rel).write_bytes(data)
            tree.bad[rel] = kind
    return tree


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_imagenet_train_tar(tree: Tree, tar_path: Path, unsafe_members: bool = True) -> dict[str, str]:
    """``ILSVRC2012_img_train.tar`` from a tree: one ``<wnid>.tar`` per class holding its files (flat).

    With ``unsafe_members`` one per-class tar also holds ``../escape.JPEG`` and ``/etc/abs.JPEG``
    (valid JPEG bytes under names that would escape an extraction directory). Returns those names.
    """
    unsafe = {}
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as outer:
        for i, wnid in enumerate(sorted({p.split("/")[0] for p in [*tree.good, *tree.bad]})):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w", format=tarfile.GNU_FORMAT) as inner:
                for f in sorted((tree.root / wnid).iterdir()):
                    _add_bytes(inner, f.name, f.read_bytes())
                if unsafe_members and i == 0:
                    some_jpeg = next(iter(sorted((tree.root / wnid).glob("*_1.JPEG")))).read_bytes()
                    for name in ("../escape.JPEG", "/etc/abs.JPEG"):
                        _add_bytes(inner, name, some_jpeg)
                        unsafe[name] = wnid
            _add_bytes(outer, f"{wnid}.tar", inner_buf.getvalue())
    return unsafe


def write_flat_with_loc_csv(tree: Tree, flat: Path, csv_path: Path) -> dict[str, str]:
    """ImageNet's val layout: ``flat/ILSVRC2012_val_<n>.JPEG`` + ``LOC_val_solution.csv``.

    Returns file name -> wnid. PredictionString holds boxes as ImageNet's does: ``wnid x y x y wnid ...``.
    """
    flat.mkdir(parents=True, exist_ok=True)
    labels = {}
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for n, (rel, wnid) in enumerate(sorted(tree.good.items()), start=1):
            image_id = f"ILSVRC2012_val_{n:08d}"
            (flat / f"{image_id}.JPEG").write_bytes((tree.root / rel).read_bytes())
            w.writerow([image_id, f"{wnid} 10 12 80 90 {wnid} 30 31 60 70 "])
            labels[f"{image_id}.JPEG"] = wnid
    return labels


def write_kaggle_layout(tree: Tree, folder: Path, csv_path: Path) -> dict[str, str]:
    """The seed's Kaggle layout: ``folder/<id>.jpg`` + ``train.csv`` with columns ``id,species,...``."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "species", "margin1"])
        for n, (rel, wnid) in enumerate(sorted(tree.good.items()), start=1):
            species = f"species_{wnid}"
            (folder / f"{n}.jpg").write_bytes((tree.root / rel).read_bytes())
            w.writerow([n, species, "0.5"])
            labels[f"{n}.jpg"] = species
    return labels


# A build whose read of one file never returns (like a file on a hung network mount): it stops at a fixed
# point, after the shards before that file are finished, until the test kills it. The sharder itself skips
# FIFOs and other special files, so the stall is injected here, in the process that runs the command.
_BLOCKING_BUILD = """
import sys, time
import shards.build as build
from shards.__main__ import main
stuck, argv = sys.argv[1], sys.argv[2:]
read = build.read_item_bytes
def blocking_read(item):
    if item.file == stuck:
        time.sleep(3600)
    return read(item)
build.read_item_bytes = blocking_read
sys.exit(main(argv))
"""


def blocking_build_argv(python: str, stuck_file: str, args: list) -> list[str]:
    """argv for ``python -m shards <args>`` that blocks forever when it reads ``stuck_file`` (an item's
    ``file``: its path relative to SOURCE)."""
    return [python, "-c", _BLOCKING_BUILD, stuck_file, *map(str, args)]


def kill_build_after_first_shard(argv: list[str], out: Path, env: dict, cwd: Path) -> None:
    """Run a blocking build (``blocking_build_argv``), wait until ``train-000001.tar`` is finished while the
    build is stuck, then SIGKILL it: an interrupted build with finished shards and no manifest."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / "train-000001.tar").exists():
            assert proc.poll() is None, "the build ended before it reached the blocking file"
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None and (out / "train-000001.tar").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
