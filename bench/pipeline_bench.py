"""DALI vs the reference loader on ImageNet-sized JPEGs: ``python bench/pipeline_bench.py [OUT]``.

Builds (once) a train split of real photograph crops re-encoded like ImageNet (shorter side 375,
JPEG quality 90, about 500 x 375) with ``python -m shards build``, then runs
``python -m pipeline bench SHARDS --json`` on it (paper crop, flip, PCA lighting; DALI CPU graph with
2 threads vs Pillow + webdataset + DataLoader with 2 workers) and prints its output. Record the
figures, with the machine, date and load average, in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_photo_split(out: Path, per_class: int, shorter: int = 375) -> Path:
    """Class folders of distinct photograph crops, resized so the shorter side is ``shorter``."""
    from PIL import Image

    from shards.sample_data import photo_crops

    split = out / "train"
    if (split / "manifest.json").is_file():
        return split
    raw = out / "raw"
    crops = photo_crops(per_class=per_class, n_classes=8, seed=0, min_side=300, max_side=520)
    for i, (wnid, pixels) in enumerate(crops):
        image = Image.fromarray(pixels)
        w, h = image.size
        scale = shorter / min(w, h)
        folder = raw / wnid
        folder.mkdir(parents=True, exist_ok=True)
        image.resize((round(w * scale), round(h * scale)), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    subprocess.run([sys.executable, "-m", "shards", "build", str(raw), str(split), "--split", "train",
                    "--max-count", "500"], check=True, cwd=REPO)
    return split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=os.path.join(tempfile.gettempdir(), "alexnet-pipeline-bench"),
                        help="where the photo shards are built (kept for reruns)")
    parser.add_argument("--per-class", type=int, default=250, help="images per class, 8 classes (default 250)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed on to python -m pipeline bench")
    args = parser.parse_args()
    split = build_photo_split(Path(args.out), args.per_class)
    return subprocess.run([sys.executable, "-m", "pipeline", "bench", str(split), "--json", *args.bench_args],
                          cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
