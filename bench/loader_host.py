"""The DALI loader's per-batch host work on the main thread: per-sample Python (as before) vs whole-batch.

What the training loop's thread does for every batch besides handing the images to torch: parse the labels
(``cls``), number the samples (``source_info`` -> split-wide numbers, for the resume bitmap) and, with
``with_source``, name them. Both versions run on the same real DALI outputs (a CPU graph over real shards,
batch 256 by default), rounds interleaved; their results must be identical.

    python bench/loader_host.py [SHARD_DIR] [--batch 256] [--rounds 7] [--reps 20]

Without SHARD_DIR it builds scikit-learn's digits as shards under $TMPDIR/loader_host_digits (kept).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import LoaderConfig, make_train_loader  # noqa: E402
from pipeline.dali_loader import build_pipeline, parse_labels, sample_keys  # noqa: E402
from pipeline.shardset import jpg_offsets  # noqa: E402


# ---- the per-sample versions, as the loader had them
def parse_labels_per_sample(cls_batch) -> torch.Tensor:
    return torch.tensor([int(np.array(cls_batch[i]).tobytes()) for i in range(len(cls_batch))], dtype=torch.int64)


def sample_keys_per_sample(source_info) -> list[str]:
    return [np.array(source_info[i]).tobytes().decode().rsplit(":", 1)[1].rsplit(".", 1)[0]
            for i in range(len(source_info))]


def numbers_per_sample(by_tar: dict, source_info) -> np.ndarray:
    out = np.empty(len(source_info), dtype=np.int64)
    for i in range(len(source_info)):
        tar, offset, _ = np.array(source_info[i]).tobytes().decode().rsplit(":", 2)
        shard = by_tar[tar]
        out[i] = shard.first + int(np.searchsorted(jpg_offsets(shard.index), int(offset)))
    return out


def digits_shards() -> Path:
    from shards.build import BuildConfig, build
    from shards.sample_data import export_digits
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "loader_host_digits"
    if not (root / "built").is_file():
        export_digits(root / "raw", size=64)
        build(BuildConfig(str(root / "raw" / "train"), str(root / "train"), "train", max_count=300, seed=0),
              progress=False)
        (root / "built").touch()
    return root / "train"


def best_ms(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1000 * (time.perf_counter() - t0) / reps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shards", nargs="?", help="a shard directory (default: digits, built once)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=20, help="calls per timing")
    args = p.parse_args(argv)
    shard_dir = args.shards or str(digits_shards())
    cfg = LoaderConfig(shard_dir=shard_dir, device="cpu", image_size=63, batch_size=args.batch, num_threads=1,
                       seed=0)
    loader = make_train_loader(cfg)            # for its tar -> shard table, as _numbers uses it
    pipe = build_pipeline(cfg, loader.shardset, train=True, with_source=True)
    _, cls, source = pipe.run()

    old = {"labels": lambda: parse_labels_per_sample(cls),
           "numbers": lambda: numbers_per_sample(loader._by_tar, source),
           "keys": lambda: sample_keys_per_sample(source)}
    new = {"labels": lambda: parse_labels(cls), "numbers": lambda: loader._numbers(source),
           "keys": lambda: sample_keys(source)}
    for name in old:   # the same answers first
        a, b = old[name](), new[name]()
        same = torch.equal(a, b) if name == "labels" else np.array_equal(a, b) if name == "numbers" else a == b
        if not same:
            raise SystemExit(f"{name}: the whole-batch version differs from the per-sample one")
    times = {(side, name): [] for side in ("per-sample", "whole-batch") for name in old}
    for _ in range(args.rounds):
        for side, fns in (("per-sample", old), ("whole-batch", new)):
            for name, fn in fns.items():
                times[(side, name)].append(best_ms(fn, args.reps))
    print(f"{shard_dir}: batch {args.batch}, {args.rounds} rounds x {args.reps} calls, median ms per batch "
          f"(load average {os.getloadavg()[0]:.1f})")
    print("| work | per-sample ms | whole-batch ms | ratio |\n|---|---|---|---|")
    totals = {"per-sample": 0.0, "whole-batch": 0.0}
    for name in old:
        a, b = (statistics.median(times[(side, name)]) for side in ("per-sample", "whole-batch"))
        totals["per-sample"] += a
        totals["whole-batch"] += b
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.1f}x |")
    a, b = totals["per-sample"], totals["whole-batch"]
    print(f"| all three | {a:.3f} | {b:.3f} | {a / b:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
