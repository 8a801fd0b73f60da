"""python -m trainer fit | ablate | eval | predict  (see docs/training.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from trainer.config import PRESETS, build_config
from trainer.faults import TrainingStopped


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train AlexNet with Ray Train (resumes when RUN_DIR has a checkpoint)")
    f.add_argument("--train", required=True, help="training shard directory (python -m shards build)")
    f.add_argument("--val", required=True, help="validation shard directory")
    f.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory; rerun to resume")
    f.add_argument("--preset", choices=sorted(PRESETS), default=None, help="recipe (default: modern)")
    add_run_flags(f)

    a = sub.add_parser("ablate", help="train a base config and named variants (the paper's design claims) on the "
                       "same data, seeds and budget; report the differences (resumes when DIR has runs)")
    a.add_argument("--train", required=True, help="training shard directory (python -m shards build)")
    a.add_argument("--val", required=True, help="validation shard directory")
    a.add_argument("--out", required=True, metavar="DIR", help="one RUN_DIR per run under it, and the report")
    a.add_argument("--base-preset", choices=sorted(PRESETS), default="paper", help="the base recipe (default: paper)")
    a.add_argument("--variants", nargs="+", metavar="NAME", help="variants to run (default: every built-in one "
                   "that changes the base, and every --variant)")
    a.add_argument("--variant", dest="custom", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="define (and run) your own variant, e.g. --variant wide=model.width=0.5 (repeatable)")
    a.add_argument("--seeds", type=int, default=1, help="seeds per variant: train.seed, train.seed + 1, ...")
    a.add_argument("--train-error-threshold", type=float, default=0.25, metavar="E",
                   help="report the epochs each variant needs to reach this training error (default 0.25, Figure 1)")
    add_run_flags(a)
    add_eval_commands(sub)
    return p


def add_run_flags(f: argparse.ArgumentParser) -> None:
    """The flags fit and ablate share (every run of an ablation is a fit with them)."""
    f.add_argument("--config", metavar="FILE", help="YAML file of config sections")
    f.add_argument("--workers", type=workers_arg, metavar="N|MIN-MAX|auto",
                   help="Ray Train workers (data-parallel ranks); auto (default): one per GPU of the cluster, 1 "
                   "without GPUs; 0 = local mode: train in this process, no Ray cluster (under torchrun, one rank "
                   "per process); MIN-MAX, e.g. 2-4: an elastic group that trains with any size in between, "
                   "shrinking when nodes go and growing when they come back")
    f.add_argument("--gpus-per-worker", type=auto_or(float), metavar="G|auto",
                   help="auto (default): 1 (2 with --parallel model) where the cluster has GPUs, else 0; "
                   "0 = CPU workers (gloo); >0 = GPU workers (NCCL)")
    f.add_argument("--epochs", type=int)
    f.add_argument("--batch-size", type=int, help="global batch, split across workers (the paper: 128)")
    f.add_argument("--width", type=float, help="multiplies every conv and fc width (1.0 = the paper)")
    f.add_argument("--loader", choices=["dali", "reference"])
    f.add_argument("--parallel", choices=["data", "model"],
                   help="data: DDP across workers; model: also split each worker's net over two devices")
    f.add_argument("--stage-to", metavar="DIR", help="copy --train/--val (paths or fsspec URLs) to DIR on each "
                   "node first (one copy per node, sha256-checked)")
    f.add_argument("--verbose", action="store_true",
                   help="also show Ray's own log lines (kept in Ray's log folder otherwise)")
    f.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=0.02 (repeatable)")


def add_eval_commands(sub) -> None:
    e = sub.add_parser("eval", help='print {"top1", "top5", "n"} over every image of a shard directory')
    e.add_argument("--checkpoint", required=True, help="RUN_DIR/best.pt or RUN_DIR/last.pt")
    e.add_argument("--data", required=True, help="shard directory")
    e.add_argument("--ten-crop", action="store_true", help="the paper's 10 patches, softmax averaged")
    e.add_argument("--workers", type=int, default=1, help="ranks; >1 runs them as Ray tasks")
    e.add_argument("--loader", choices=["dali", "reference"], default="dali")
    e.add_argument("--batch-size", type=int, default=64, help="per rank")

    pr = sub.add_parser("predict", help="top-5 class names and probabilities for each image")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--json", action="store_true", help="one JSON object per image instead of text")


def auto_or(kind: type):
    def parse(text: str):
        if text == "auto":
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} or auto, "
                                             f"got {text!r}") from None
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


def workers_arg(text: str):
    """``--workers``: N, auto, or MIN-MAX (an elastic group)."""
    low, dash, high = text.partition("-")
    if not dash:
        return auto_or(int)(text)
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N, MIN-MAX (e.g. 2-4) or auto, got {text!r}") from None


def workers_flags(workers) -> dict:
    """``--workers`` as config keys: MIN-MAX sets run.min_workers/max_workers (and run.workers to MAX); a fixed
    N or auto clears them, so the command line wins over an elastic group in --config."""
    if workers is None:
        return {}
    if isinstance(workers, tuple):
        return {"run.min_workers": workers[0], "run.max_workers": workers[1], "run.workers": workers[1]}
    return {"run.workers": workers, "run.min_workers": 0, "run.max_workers": 0}


def fit_flags(args: argparse.Namespace) -> dict:
    return {"data.train": args.train, "data.val": args.val, "run.out": args.out, **workers_flags(args.workers),
            "run.gpus_per_worker": args.gpus_per_worker, "train.epochs": args.epochs,
            "train.batch_size": args.batch_size, "model.width": args.width, "data.loader": args.loader,
            "run.parallel": args.parallel, "data.stage_to": args.stage_to}


def ablate(args: argparse.Namespace) -> None:
    from trainer.ablate import Plan, choose_variants, parse_variant, run_ablation

    if not 1 <= args.seeds <= 100:
        raise ValueError(f"--seeds must be in 1..100, got {args.seeds}")
    if not 0 < args.train_error_threshold < 1:
        raise ValueError(f"--train-error-threshold must be in (0, 1), got {args.train_error_threshold}")
    flags = {**fit_flags(args), "run.out": str(Path(args.out) / "base")}
    base = build_config(args.base_preset, args.config, flags, args.sets)
    custom = [parse_variant(text) for text in args.custom]
    variants = choose_variants(base, args.variants, custom)
    plan = Plan.make(base, args.out, variants, args.seeds, args.train_error_threshold)
    print(f"[ablate] {len(variants)} variant(s) + base x {args.seeds} seed(s), preset {base.preset}, "
          f"{base.train.epochs} epochs each: {', '.join(v.name for v in variants)} -> {plan.out}", flush=True)
    run_ablation(plan, verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "fit":
            cfg = build_config(args.preset, args.config, fit_flags(args), args.sets)
            from trainer.console import summary
            from trainer.fit import fit
            from trainer.ray_cluster import ray_log_dir
            started = time.perf_counter()
            fit(cfg, verbose=args.verbose)
            if int(os.environ.get("RANK", 0)) == 0:   # under torchrun: one closing summary
                print("\n".join(summary(cfg.run.out, time.perf_counter() - started,
                                        ray_log_dir() if cfg.run.workers else None)), flush=True)
        elif args.command == "ablate":
            ablate(args)
        elif args.command == "eval":
            from trainer.evaluate import evaluate
            r = evaluate(args.checkpoint, args.data, ten_crop=args.ten_crop, workers=args.workers,
                         loader=args.loader, batch_size=args.batch_size)
            print(json.dumps({"top1": r["top1"], "top5": r["top5"], "n": r["n"]}), flush=True)
        else:
            from trainer.evaluate import predict
            for r in predict(args.checkpoint, args.images):
                if args.json:
                    print(json.dumps(r))
                else:
                    print(r["image"])
                    for rank, c in enumerate(r["top5"], 1):
                        print(f"  {rank}. {c['class']:<30} {c['prob']:.4f}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # e.g. a NaN loss: the run stopped on purpose, its last good checkpoint kept
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0
