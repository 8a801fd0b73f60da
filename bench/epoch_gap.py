"""The wait at an epoch boundary, with and without the next epoch's DALI pipeline built ahead:
``python bench/epoch_gap.py [OUT] [--epochs 3] [--repeats 3] [--step-ms 100]``.

A training loop that sleeps ``--step-ms`` per batch (the GPU's step: the CPU is free meanwhile) reads
ImageNet-sized photo shards (bench/pipeline_bench.py builds them once under OUT) through the DALI CPU graph.
The gap is the time from the end of epoch e's last step to the arrival of epoch e+1's first batch
(``set_epoch`` and the new iterator included); the steady wait is the median time ``next()`` blocks
inside an epoch. Both loaders run side by side (alternating, same shards, same seeds), so machine load
hits both alike. Prints one JSON line; record it in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_epochs(loader, epochs: int, step_s: float) -> tuple[list[float], list[float]]:
    """(gaps at each boundary, waits inside the epochs) in seconds."""
    gaps, waits, last_done = [], [], None
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        it = iter(loader)
        t = time.perf_counter()
        for step in range(len(loader)):
            next(it)
            got = time.perf_counter()
            if step == 0 and last_done is not None:
                gaps.append(got - last_done)
            elif step:
                waits.append(got - t)
            time.sleep(step_s)           # the training step
            t = time.perf_counter()
        last_done = t
        for _ in it:                     # end the epoch (its pipeline is released)
            pass
    return gaps, waits


def main() -> int:
    from bench.pipeline_bench import build_photo_split
    from pipeline import LoaderConfig, make_train_loader

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=os.path.join(tempfile.gettempdir(), "alexnet-pipeline-gap"))
    parser.add_argument("--per-class", type=int, default=40, help="images per class, 8 classes (default 40)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run: epochs - 1 boundaries")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternating")
    parser.add_argument("--step-ms", type=float, default=100.0, help="simulated training step")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    split = build_photo_split(Path(args.out), args.per_class)
    cfg = LoaderConfig(shard_dir=str(split), batch_size=args.batch_size, num_threads=args.threads)
    results = {"ahead": ([], []), "fresh": ([], [])}
    for _ in range(args.repeats):
        for mode in ("fresh", "ahead"):
            loader = make_train_loader(cfg, kind="dali")
            loader.build_ahead = mode == "ahead"
            gaps, waits = run_epochs(loader, args.epochs, args.step_ms / 1e3)
            results[mode][0].extend(gaps)
            results[mode][1].extend(waits)
            del loader
    out = {mode: {"gap_ms_median": 1e3 * statistics.median(g), "gap_ms": [round(1e3 * x, 1) for x in g],
                  "steady_wait_ms_median": 1e3 * statistics.median(w)} for mode, (g, w) in results.items()}
    out["gap_ratio_fresh_over_ahead"] = out["fresh"]["gap_ms_median"] / out["ahead"]["gap_ms_median"]
    out["setup"] = {"images": num_images(split), "batch_size": args.batch_size, "threads": args.threads,
                    "step_ms": args.step_ms, "epochs": args.epochs, "repeats": args.repeats,
                    "shuffle_buffer": cfg.shuffle_buffer, "cpus": os.cpu_count(), "loadavg": os.getloadavg()[0]}
    print(json.dumps(out))
    return 0


def num_images(split: Path) -> int:
    return json.loads((split / "manifest.json").read_text())["num_samples"]


if __name__ == "__main__":
    sys.exit(main())
