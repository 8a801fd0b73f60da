"""Training images/s on the CPU: AlexNet at several widths, fed by the data pipeline vs by synthetic tensors.

    python bench/train.py [--shards DIR] [--widths 1.0 0.5 0.25] [--image-size 224] [--batch-size 32]
                          [--steps 3] [--rounds 3] [--loader dali|reference] [--json]

For each width, side by side in one process (one data-parallel rank, what each Ray worker runs):
  synthetic  train steps on one random batch reused (the model's ceiling on this machine)
  pipeline   train steps on batches from the loader (decode + augment + train, sharing the cores)
  loader     the loader alone, no model (the input ceiling)
  split      synthetic steps of trainer.parallel.split_two_devices(model, ["cpu", "cpu"]), the paper's
             two-column split on two CPU devices; ``split/single`` is its step time over the
             single-device model's (>1: the split costs that much more); --no-split skips it
``pipeline / synthetic`` is the fraction of the model's speed the input pipeline lets through; 1.0 means
the run is compute-bound. Without --shards the sklearn digits are sharded into a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.model import AlexNet, count_parameters  # noqa: E402
from trainer.parallel import split_two_devices  # noqa: E402


def digits_shards(root: Path) -> Path:
    from shards.build import BuildConfig, build
    from shards.sample_data import export_digits

    export_digits(root / "raw", size=64)
    build(BuildConfig(str(root / "raw" / "train"), str(root / "train"), "train", max_count=300, seed=0), progress=False)
    return root / "train"


def train_step(model, optimizer, images, labels) -> None:
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed(it, steps: int, step_fn) -> float:
    """images/s over the next ``steps`` batches of the iterator ``it``."""
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(it)
        step_fn(x, y)
        images += y.shape[0]
    return images / (time.perf_counter() - start)


def interleaved(sources: dict, steps: int, rounds: int, step_fn, warmup: int = 3) -> dict[str, float]:
    """Median images/s per source over ``rounds`` rounds that alternate the sources, after ``warmup``
    batches each, so load from other processes hits every source alike. ``step_fn``: one function, or
    one per source name."""
    its = {name: iter(src) for name, src in sources.items()}
    fns = step_fn if isinstance(step_fn, dict) else {name: step_fn for name in its}
    for name, it in its.items():   # oneDNN creates its kernels over the first few steps: several times slower
        for _ in range(warmup):
            fns[name](*next(it))
    rates = {name: [] for name in its}
    for _ in range(rounds):
        for name, it in its.items():
            rates[name].append(timed(it, steps, fns[name]))
    return {name: statistics.median(r) for name, r in rates.items()}


def endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="training shard directory (default: sklearn digits, built in a temp dir)")
    p.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and source")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating synthetic / pipeline; medians reported")
    p.add_argument("--loader", choices=["dali", "reference"], default="dali")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads and loader threads")
    p.add_argument("--json", action="store_true", help="also print one JSON object per width")
    p.add_argument("--no-split", dest="split", action="store_false", help="skip the two-column split's timing")
    args = p.parse_args()

    from pipeline import LoaderConfig, make_train_loader
    from shards.manifest import load_classes

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        shard_dir = Path(args.shards) if args.shards else digits_shards(Path(tmp))
        classes = load_classes(shard_dir)
        lcfg = LoaderConfig(shard_dir=str(shard_dir), batch_size=args.batch_size, device="cpu", seed=0,
                            image_size=args.image_size, resize_shorter=round(args.image_size * 256 / 224),
                            num_threads=args.threads, num_workers=args.threads)
        print(f"# bench/train.py: {platform.node()} {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}, torch {torch.__version__} ({args.threads} threads), loader {args.loader}, "
              f"{shard_dir} ({len(classes)} classes), batch {args.batch_size}, {args.image_size} px, "
              f"median of {args.rounds} interleaved rounds of {args.steps} steps", flush=True)
        loader_only = interleaved({"loader": endless(make_train_loader(lcfg, kind=args.loader))}, args.steps * 2,
                                  args.rounds, lambda x, y: None)["loader"]
        print(f"{'width':>6} {'params':>11} {'synthetic img/s':>16} {'pipeline img/s':>15} "
              f"{'pipeline/synthetic':>19} {'loader alone img/s':>19}" + (f" {'split/single':>13}" if args.split else ""),
              flush=True)
        for width in args.widths:
            torch.manual_seed(0)
            model = AlexNet(len(classes), width=width, image_size=args.image_size, init="kaiming")
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            step = lambda x, y: train_step(model, optimizer, x, y)  # noqa: E731
            x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
            y = torch.randint(0, len(classes), (args.batch_size,))
            sources = {"synthetic": iter(lambda: (x, y), None),
                       "pipeline": endless(make_train_loader(lcfg, kind=args.loader))}
            step_fns = {"synthetic": step, "pipeline": step}
            if args.split:   # same weights, columns on two CPU devices (trainer/parallel.py)
                split = split_two_devices(model, ["cpu", "cpu"])
                split_opt = torch.optim.SGD(split.parameters(), lr=1e-3, momentum=0.9)
                sources["split"] = iter(lambda: (x, y), None)
                step_fns["split"] = lambda x, y: train_step(split, split_opt, x, y)
            rates = interleaved(sources, args.steps, args.rounds, step_fns)
            synthetic, fed = rates["synthetic"], rates["pipeline"]
            row = {"width": width, "params": count_parameters(model), "image_size": args.image_size,
                   "batch_size": args.batch_size, "synthetic_img_s": synthetic, "pipeline_img_s": fed,
                   "ratio": fed / synthetic, "loader_img_s": loader_only, "loader": args.loader,
                   "load_average": os.getloadavg()[0]}
            split_col = ""
            if args.split:
                row["split_img_s"] = rates["split"]
                row["split_step_ratio"] = synthetic / rates["split"]
                split_col = f" {row['split_step_ratio']:>13.2f}"
            print(f"{width:>6g} {row['params']:>11,} {synthetic:>16.1f} {fed:>15.1f} {row['ratio']:>19.2f} "
                  f"{loader_only:>19.1f}{split_col}", flush=True)
            if args.json:
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
