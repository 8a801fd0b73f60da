"""Images/s of ``python -m shards build`` against a plain single-process ``webdataset.ShardWriter`` loop.

Input: an ImageNet-like class-folder tree written from the real photographs that ship with
scikit-image / scikit-learn (``shards.sample_data.photo_crops``: crops 300-500 px a side, about the
size of an ILSVRC-2012 image, 8 real wnids). Both sides get the same files, already in the page cache.

- copy mode: ``build --workers 2`` (keeps each JPEG's bytes, but decodes every image fully to catch
  truncated / CMYK / mislabelled files) vs a loop that reads each file and writes its bytes.
- resize mode: ``build --resize-shorter 256 --workers 2`` vs a loop that decodes, resizes (shorter side
  256, bicubic) and re-encodes each image with Pillow in one process, then writes it.

The figure is the ratio of the two, measured one after the other in the same run (``build --workers 1``
is shown too, to separate the per-image cost from the parallelism). Usage:
    python bench/shards.py [--per-class 60] [--workers 2]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from shards.build import BuildConfig, build  # noqa: E402
from shards.sample_data import photo_crops  # noqa: E402


def write_tree(root: Path, per_class: int) -> list[tuple[Path, str]]:
    files = []
    counters: dict[str, int] = {}
    for wnid, pixels in photo_crops(per_class, 8, seed=0, min_side=300, max_side=500):
        n = counters[wnid] = counters.get(wnid, 0) + 1
        path = root / wnid / f"{wnid}_{n}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        files.append((path, wnid))
    return files


def baseline(files: list[tuple[Path, str]], out: Path, resize_shorter: int | None) -> float:
    """The plain loop: one process, webdataset.ShardWriter. Returns seconds."""
    classes = {w: i for i, w in enumerate(sorted({w for _, w in files}))}
    order = list(files)
    random.Random(0).shuffle(order)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with wds.ShardWriter(str(out / "base-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, (path, wnid) in enumerate(order):
            data = path.read_bytes()
            if resize_shorter is not None:
                img = Image.open(io.BytesIO(data)).convert("RGB")
                scale = resize_shorter / min(img.size)
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                data = buf.getvalue()
            sink.write({"__key__": f"{i:08d}", "jpg": data, "cls": str(classes[wnid]).encode()})
    return time.perf_counter() - t0


def timed_build(source: Path, out: Path, workers: int, resize_shorter: int | None) -> float:
    cfg = BuildConfig(str(source), str(out), "train", workers=workers, resize_shorter=resize_shorter,
                      quality=90, max_count=1000)
    t0 = time.perf_counter()
    build(cfg, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=60, help="images per class, 8 classes (default 60)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        tmp = Path(tmp)
        files = write_tree(tmp / "src", args.per_class)
        n = len(files)
        mb = sum(p.stat().st_size for p, _ in files) / 1e6
        print(f"{n} JPEGs ({mb:.1f} MB, 300-500 px a side) on {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}, {date.today()}")
        rows = []
        load = os.getloadavg()
        for mode, resize in (("copy", None), ("resize-shorter 256", 256)):
            base_s = baseline(files, tmp / f"base_{resize}", resize)
            one_s = timed_build(tmp / "src", tmp / f"one_{resize}", 1, resize)
            ours_s = timed_build(tmp / "src", tmp / f"ours_{resize}", args.workers, resize)
            rows.append((mode, n / base_s, n / one_s, n / ours_s))
        print(f"load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f}")
        print(f"| mode | plain ShardWriter loop, 1 process (images/s) | build --workers 1 | "
              f"build --workers {args.workers} | ratio (workers {args.workers} / loop) |")
        print("|---|---|---|---|---|")
        for mode, base, one, ours in rows:
            print(f"| {mode} | {base:.0f} | {one:.0f} | {ours:.0f} | {ours / base:.2f}x |")


if __name__ == "__main__":
    main()
