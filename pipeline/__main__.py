"""``python -m pipeline preview|bench SHARDS``: look at what the network sees; measure the loaders.

preview  a grid of augmented training samples with their class names (undo the normalisation to
         spot a wrong channel order or mean by eye)
bench    images/s of the DALI pipeline and of the reference loader (2 DataLoader workers) on the
         same shards with the same augmentations, run one after the other in this command;
         ``--json`` prints {"dali_img_s", "reference_img_s", "ratio"} as the last line
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from shards.fileio import atomic_write

from . import KINDS, LoaderConfig, make_train_loader
from .config import CROPS, IMAGENET_MEAN_255


def _config(args, **overrides) -> LoaderConfig:
    fields = dict(shard_dir=args.shards, batch_size=args.batch_size, seed=args.seed, crop=args.crop,
                  num_threads=args.threads, num_workers=args.workers)
    if args.no_lighting:
        fields["lighting"] = False
    return LoaderConfig(**{**fields, **overrides})


def _class_names(shard_dir: str) -> list[str]:
    from shards.manifest import read_classes_file

    entries = read_classes_file(Path(shard_dir) / "classes.json")
    return [e["name"] + (f" {e['description'].split(',')[0]}" if e.get("description") else "") for e in entries]


def preview(args) -> None:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    out = Path(args.out)
    try:  # before any decoding: a bad --out fails in a second
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder {e.filename} ({e.strerror}); "
                         f"choose a writable path") from None
    n = args.rows * args.cols
    cfg = _config(args, batch_size=n)
    names = _class_names(args.shards)
    loader = make_train_loader(cfg, kind=args.loader)
    images, labels = next(iter(loader))
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std_255).view(1, 3, 1, 1)
    pixels = (images.float().cpu() * std + mean).clamp(0, 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()                       # NHWC uint8, RGB
    size, caption = cfg.image_size, 16
    grid = Image.new("RGB", (args.cols * (size + 4) + 4, args.rows * (size + caption + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, args.cols)
        x, y = 4 + c * (size + 4), 4 + r * (size + caption + 4)
        grid.paste(Image.fromarray(np.ascontiguousarray(pixels[i])), (x, y))
        draw.text((x + 2, y + size + 2), f"{int(labels[i])} {names[int(labels[i])]}"[:36], fill="black")
    try:
        with atomic_write(out) as f:
            grid.save(f, format="PNG")
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write it ({e.strerror}); choose a writable path") from None
    print(f"{out}: {n} augmented training samples ({cfg.crop} crop, lighting "
          f"{'on' if cfg.use_lighting else 'off'}, flip {'on' if cfg.flip else 'off'}) via the {args.loader} loader")


def _images_per_s(cfg: LoaderConfig, kind: str, batches: int, warmup: int) -> float:
    """Steady-state images/s over ``batches`` batches after ``warmup`` ones (pipeline start-up,
    worker start and shuffle-buffer fill are excluded); epochs roll over as training would."""
    loader = make_train_loader(cfg, kind=kind)
    done, start, epoch = 0, None, 0
    while done < warmup + batches:
        loader.set_epoch(epoch)
        for images, labels in loader:
            done += 1
            if done == warmup:
                start = time.perf_counter()
            if done == warmup + batches:
                break
        epoch += 1
    return batches * cfg.batch_size / (time.perf_counter() - start)


def bench(args) -> None:
    cfg = _config(args)
    print(f"bench: {args.shards}, batch {cfg.batch_size}, crop={cfg.crop}, lighting="
          f"{'on' if cfg.use_lighting else 'off'}, flip on; DALI {cfg.num_threads} threads (CPU graph), "
          f"reference {cfg.num_workers} DataLoader workers; {args.batches} timed batches after "
          f"{args.warmup} warm-up, best of {args.repeat}; load average {os.getloadavg()[0]:.2f}",
          file=sys.stderr if args.json else sys.stdout)
    best = {kind: 0.0 for kind in KINDS}
    for round_ in range(args.repeat):
        for kind in KINDS:  # alternate, so both see the same machine conditions
            rate = _images_per_s(cfg, kind, args.batches, args.warmup)
            best[kind] = max(best[kind], rate)
            print(f"  round {round_ + 1}: {kind:9s} {rate:8.1f} images/s", file=sys.stderr if args.json else sys.stdout)
    ratio = best["dali"] / best["reference"]
    print(f"dali {best['dali']:.1f} images/s, reference {best['reference']:.1f} images/s, ratio {ratio:.2f}x "
          f"(load average now {os.getloadavg()[0]:.2f})", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"dali_img_s": round(best["dali"], 2), "reference_img_s": round(best["reference"], 2),
                          "ratio": round(ratio, 4)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, batch_size: int):
        p.add_argument("shards", help="a shard directory written by `python -m shards build`")
        p.add_argument("--crop", choices=CROPS, default="paper")
        p.add_argument("--no-lighting", action="store_true", help="turn PCA lighting off")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=batch_size)
        p.add_argument("--threads", type=int, default=2, help="DALI CPU threads (default 2)")
        p.add_argument("--workers", type=int, default=2, help="reference loader's DataLoader workers (default 2)")

    p = sub.add_parser("preview", help="grid of augmented training samples with class names")
    common(p, 0)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--cols", type=int, default=6)
    p.add_argument("--loader", choices=KINDS, default="dali")
    p = sub.add_parser("bench", help="DALI vs reference images/s, same shards and augmentations")
    common(p, 64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per run (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    p.add_argument("--repeat", type=int, default=2, help="alternating rounds; best of each (default 2)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    args = parser.parse_args(argv)

    from shards.manifest import ShardError
    try:
        if args.command == "preview":
            if args.rows < 1 or args.cols < 1:
                raise ValueError(f"--rows {args.rows} --cols {args.cols}: both must be at least 1")
            preview(args)
        else:
            if args.batches < 1 or args.warmup < 1 or args.repeat < 1:
                raise ValueError("--batches, --warmup and --repeat must be at least 1")
            bench(args)
    except (ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}; without DALI use --loader reference", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
