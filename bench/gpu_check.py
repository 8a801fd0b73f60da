"""One GPU, eight minutes: does the GPU path work, and how fast is it. Driven by ``bash bench/gpu_check.sh``.

The shell script builds the data, then runs each step below as its own process under its own time budget
(``timeout``). The steps live here, one function each, taking the device from the plan, so the very same code
runs on the CPU in dry mode (``--dry``: device cpu, width 0.125, 64 px, a few steps) and is tested there
(tests/test_gpu_check.py).

  data  ImageNet-sized photo shards (python -m shards build): full size, shorter side 256, and a val split
  a     the DALI graph on the device: train paper, train rrc, eval, ten-crop; GPU- vs CPU-decoded eval pixels
  b     the loader alone, images/s, batch 256: full-size and shorter-side-256 shards x hw_decoder_load x threads
  c     paper AlexNet training images/s, bf16 + channels_last, eager and torch.compile, per-GPU batch
        128 / 256 / 512, fed by synthetic tensors and by the DALI loader: loader / synthetic is the headline;
        at the fastest compiled batch also the loader alone, DALI-fed on a side stream (with and without the
        batches bound to it) and with hw_decoder_load 0, and where the host waits (in next() or in the step)
  d     python -m trainer fit (Ray Train, one GPU worker, NCCL, --preset modern), two short epochs, then
        python -m trainer eval on its best.pt
  e     bench/split.py: the two-column split on one device (two streams): equivalence and step time
  f     peak GPU memory of c and d

A step appends detail records to OUTDIR/steps/<step>.jsonl as it goes; ``settle`` turns them and the step's
exit status into the step's one row, so a step that times out or crashes keeps what it measured and costs no
other step its row; ``report`` writes OUTDIR/gpu_check.md and OUTDIR/gpu_check.jsonl and prints the table.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.fileio import write_text

STEPS = ("data", "a", "b", "c", "d", "e", "f")
WHAT = {
    "data": "photo shards built (python -m shards build)",
    "a": "DALI graph on the device (train paper, train rrc, eval, ten-crop); eval pixels vs CPU decode",
    "b": "loader alone, images/s (full-size and shorter-side-256 shards x hw_decoder_load x threads)",
    "c": "AlexNet training images/s, bf16 + channels_last: DALI loader / synthetic tensors",
    "d": "python -m trainer fit (Ray Train, 1 worker, --preset modern) 2 short epochs + trainer eval",
    "e": "bench/split.py: two-column split on one device (two streams) vs single model",
    "f": "peak GPU memory of c and d",
}
LOADER_GOAL = 25_000        # images/s from shorter-side-256 shards on one H100/H200
TRAIN_RATIO_GOAL = 0.9      # DALI-fed training / synthetic, at synthetic's best config
PIXEL_GOAL = 1.0            # mean |GPU - CPU| eval pixel, 0-255 levels


# ---------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True, kw_only=True)
class Plan:
    """Every size the check uses; ``make_plan(dry)`` gives the GPU one or the tiny CPU one."""
    dry: bool
    device: str                      # "cuda:0", or "cpu" in dry mode
    classes: int = 8                 # one shipped photograph per class
    per_class: int                   # training images per class
    val_per_class: int
    shorter: int                     # the photographs' shorter side (ImageNet-like: about 500 x 375)
    crop_sides: tuple[int, int]      # random crop sides taken from the photographs before resizing
    small_shorter: int               # the small shards' --resize-shorter (256)
    max_count: int                   # samples per shard
    crop: int                        # network input side
    width: float                     # AlexNet width (1.0 = the paper's)
    check_batch: int                 # a
    loader_batch: int                # b
    hw_loads: tuple[float, ...]
    threads: tuple[int, ...]
    loader_warmup: int
    loader_batches: int
    train_batches: tuple[int, ...]   # c: eager, most telling first
    compile_batches: tuple[int, ...]  # c: compiled (tens of seconds each); the fastest gets c's diagnostics
    compile_backend: str             # c: inductor; dry: aot_eager (dynamo + AOT autograd, no C++ build on 2 cores)
    train_warmup: int
    train_steps: int
    train_threads: int               # c, d: DALI threads when b gives no best config
    fit_batch: int                   # d: global batch, one worker
    fit_steps: int                   # d: train.max_steps_per_epoch
    split_args: tuple[str, ...]      # e: bench/split.py arguments
    model_classes: int = 1000        # c: the paper's fc8
    late_compile_batches: tuple[int, ...] = ()   # c: compiled after the diagnostics (first to go when short)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def resize_shorter(self) -> int:
        return round(self.crop * 256 / 224)


def make_plan(dry: bool) -> Plan:
    if dry:   # the same steps on a 2-core CPU in about 3 minutes
        return Plan(dry=True, device="cpu", per_class=24, val_per_class=4, shorter=96, crop_sides=(60, 160),
                    small_shorter=80, max_count=64, crop=64, width=0.125,
                    check_batch=8, loader_batch=16, hw_loads=(0.0, 1.0), threads=(2,), loader_warmup=2,
                    loader_batches=4, train_batches=(8,), compile_batches=(8,), compile_backend="aot_eager",
                    train_warmup=1, train_steps=2, train_threads=2, fit_batch=16, fit_steps=3,
                    split_args=("--device", "cpu", "--width", "0.125", "--batch", "2", "--rounds", "1",
                                "--steps", "1"))
    return Plan(dry=False, device="cuda:0", per_class=1536, val_per_class=64, shorter=375, crop_sides=(300, 520),
                small_shorter=256, max_count=1000, crop=224, width=1.0,
                check_batch=64, loader_batch=256, hw_loads=(0.0, 0.65, 1.0), threads=(4, 8, 16), loader_warmup=6,
                loader_batches=30, train_batches=(256, 512, 128), compile_batches=(256, 512),
                late_compile_batches=(128,),
                compile_backend="inductor", train_warmup=3, train_steps=20, train_threads=8, fit_batch=256,
                fit_steps=20,
                split_args=("--device", "cuda", "--width", "1", "--batch", "128", "--rounds", "3", "--steps", "10"))


@dataclass
class Ctx:
    """What a step gets: the plan, where things are, and its own deadline."""
    plan: Plan
    out: Path        # OUTDIR: results only (it is copied back from the GPU machine)
    data: Path       # shards: train_full, train_small, val
    work: Path       # scratch: the fit's run directory (hundreds of MB of checkpoints)
    deadline: float  # time.monotonic() past which the step would be killed

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def details(self, step: str) -> list[dict]:
        return read_jsonl(self.out / "steps" / f"{step}.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut short by a kill
            pass
    return rows


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1][:200] if text else ''}"


def cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 quota (a container on a big host)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def free_device(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch
        torch.cuda.empty_cache()


def loader_config(plan: Plan, shards: Path, **changes):
    from pipeline import LoaderConfig
    fields = dict(shard_dir=str(shards), device=plan.device, image_size=plan.crop,
                  resize_shorter=plan.resize_shorter, seed=0, batch_size=plan.check_batch,
                  num_threads=plan.train_threads, num_workers=2)
    return LoaderConfig(**{**fields, **changes})


# ---------------------------------------------------------------------------------------- data

_PHOTOS: list | None = None


def _write_photos(job: tuple) -> int:
    """One chunk of distinct crops of one shipped photograph, resized to ``shorter`` and saved like ImageNet."""
    global _PHOTOS
    import numpy as np
    from PIL import Image

    from shards.sample_data import photographs

    folder, photo_index, seed, start, count, shorter, sides = job
    if _PHOTOS is None:
        _PHOTOS = list(photographs().values())
    photo = _PHOTOS[photo_index]
    h, w = photo.shape[:2]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        ch = int(rng.integers(min(sides[0], h), min(sides[1], h) + 1))
        cw = int(rng.integers(min(sides[0], w), min(sides[1], w) + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = Image.fromarray(np.ascontiguousarray(photo[y:y + ch, x:x + cw]))
        scale = shorter / min(ch, cw)
        image = image.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return count


def write_raw(plan: Plan, raw: Path) -> int:
    """Class folders raw/{train,val}/<wnid>/*.jpg: crops of the shipped photographs, one photograph per class."""
    import multiprocessing

    from shards.sample_data import IMAGENET_WNIDS

    global _PHOTOS
    from shards.sample_data import photographs
    _PHOTOS = list(photographs().values())   # loaded once; the forked workers share it
    wnids = sorted(IMAGENET_WNIDS)[:plan.classes]
    jobs, chunk = [], 64
    for split, per_class, seed0 in (("train", plan.per_class, 0), ("val", plan.val_per_class, 10_000)):
        for c, wnid in enumerate(wnids):
            for start in range(0, per_class, chunk):
                jobs.append((raw / split / wnid, c, seed0 + c * 1000 + start, start, min(chunk, per_class - start),
                             plan.shorter, plan.crop_sides))
    with multiprocessing.get_context("fork").Pool(cpus()) as pool:
        return sum(pool.imap_unordered(_write_photos, jobs))


def shards_build(source: Path, out: Path, split: str, *extra: str, workers: int, max_count: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shards", "build", str(source), str(out), "--split", split, "--quiet",
           "--workers", str(workers), "--max-count", str(max_count), *extra]
    return subprocess.Popen(cmd, cwd=REPO)


def step_data(ctx: Ctx):
    """Build (or reuse) the three shard directories; kept between runs under --data."""
    from shards.manifest import load_manifest

    plan, data = ctx.plan, ctx.data
    stamp = data / "plan.json"
    want = {k: v for k, v in asdict(plan).items()
            if k in ("classes", "per_class", "val_per_class", "shorter", "crop_sides", "small_shorter", "max_count")}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(want)):
        for name in ("train_full", "train_small", "val"):
            yield {"shards": name, "samples": load_manifest(data / name)["num_samples"], "reused": True}
        return
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.perf_counter()
    images = write_raw(plan, data / "raw")
    yield {"raw_jpegs": images, "seconds": round(time.perf_counter() - t0, 1)}
    workers = max(1, cpus() // 2)
    t1 = time.perf_counter()
    full = shards_build(data / "raw" / "train", data / "train_full", "train", workers=workers,
                        max_count=plan.max_count)
    small = shards_build(data / "raw" / "train", data / "train_small", "train", "--resize-shorter",
                         str(plan.small_shorter), workers=workers, max_count=plan.max_count)
    if full.wait() != 0:
        raise RuntimeError(f"python -m shards build {data / 'train_full'} exited {full.returncode}")
    val = shards_build(data / "raw" / "val", data / "val", "val",
                       "--classes", str(data / "train_full" / "classes.json"),
                       workers=workers, max_count=plan.max_count)
    for name, proc in (("train_small", small), ("val", val)):
        if proc.wait() != 0:
            raise RuntimeError(f"python -m shards build {data / name} exited {proc.returncode}")
    for name in ("train_full", "train_small", "val"):
        m = load_manifest(data / name)
        yield {"shards": name, "samples": m["num_samples"], "shards_files": len(m.get("shards", [])),
               "mb": round(sum(p.stat().st_size for p in (data / name).glob("*.tar")) / 2**20, 1)}
    yield {"build_seconds": round(time.perf_counter() - t1, 1)}
    shutil.rmtree(data / "raw", ignore_errors=True)
    stamp.write_text(json.dumps(want))


def summary_data(details: list[dict], plan: Plan) -> dict:
    counts = {d["shards"]: d["samples"] for d in details if "shards" in d}
    expect = {"train_full": plan.per_class * plan.classes, "train_small": plan.per_class * plan.classes,
              "val": plan.val_per_class * plan.classes}
    figure = ", ".join(f"{k} {v}" for k, v in counts.items()) or "no shards"
    if any(d.get("reused") for d in details):
        figure += " (reused)"
    return {"figure": figure, "goal": f"{expect['train_full']} + {expect['train_small']} + {expect['val']} images",
            "passed": counts == expect}


# ---------------------------------------------------------------------------------------- a: graphs

def _check_batch(images, labels, cfg, ten_crop: bool, classes: int) -> None:
    import torch
    side = cfg.image_size
    want = (cfg.batch_size, 10, 3, side, side) if ten_crop else (cfg.batch_size, 3, side, side)
    if tuple(images.shape) != want:
        raise AssertionError(f"images {tuple(images.shape)}, expected {want}")
    if images.device != torch.device(cfg.device) or labels.device != torch.device(cfg.device):
        raise AssertionError(f"batch on {images.device}/{labels.device}, expected {cfg.device}")
    if not bool(torch.isfinite(images).all()):
        raise AssertionError("non-finite pixels")
    if not 0 <= int(labels.min()) <= int(labels.max()) < classes:
        raise AssertionError(f"labels outside 0..{classes - 1}")


def _levels(images):
    """Normalised images back on the 0-255 scale, on the CPU as float64."""
    import torch

    from pipeline.config import IMAGENET_MEAN_255, IMAGENET_STD_255
    shape = (1, 3, 1, 1)
    return (images.double().cpu() * torch.tensor(IMAGENET_STD_255, dtype=torch.float64).view(shape)
            + torch.tensor(IMAGENET_MEAN_255, dtype=torch.float64).view(shape))


def pixel_difference(cfg_a, kind_a: str, cfg_b, kind_b: str) -> dict:
    """Mean |a - b| in 0-255 levels over every eval image (same split, same stored order)."""
    from pipeline import make_eval_loader
    total, count, images, worst_image, worst_pixel = 0.0, 0, 0, 0.0, 0.0
    for (xa, ya, ma), (xb, yb, mb) in zip(make_eval_loader(cfg_a, kind=kind_a), make_eval_loader(cfg_b, kind=kind_b)):
        keep = ma.cpu()
        if not bool((keep == mb.cpu()).all()) or not bool((ya.cpu()[keep] == yb.cpu()[keep]).all()):
            raise AssertionError("the two loaders disagree on labels or padding: not the same samples")
        diff = (_levels(xa)[keep] - _levels(xb)[keep]).abs()
        total += float(diff.sum())
        count += diff.numel()
        images += int(keep.sum())
        worst_image = max(worst_image, float(diff.flatten(1).mean(1).max()))
        worst_pixel = max(worst_pixel, float(diff.max()))
    return {"images": images, "mean_abs_levels": round(total / count, 4),
            "worst_image_mean_levels": round(worst_image, 4),
            "max_abs_levels": round(worst_pixel, 2)}


def step_graphs(ctx: Ctx):
    from pipeline import make_eval_loader, make_train_loader
    from shards.manifest import load_classes

    plan = ctx.plan
    classes = len(load_classes(ctx.data / "train_full"))
    base = loader_config(plan, ctx.data / "train_full", num_threads=min(4, cpus()), num_workers=min(8, cpus()))
    val = str(ctx.data / "val")
    graphs = [("train paper", dict(crop="paper")), ("train rrc", dict(crop="rrc")),
              ("eval", dict(shard_dir=val)), ("ten-crop", dict(shard_dir=val, ten_crop=True))]
    for name, changes in graphs:
        cfg = base.replace(**changes)
        record = {"graph": name, "device": cfg.device}
        try:
            t0 = time.perf_counter()
            loader = (make_train_loader if name.startswith("train") else make_eval_loader)(cfg)
            for i, (images, labels, *_) in enumerate(loader):
                _check_batch(images, labels, cfg, cfg.ten_crop, classes)
                if i == 1:
                    break
            sync(cfg.device)
            record.update(ok=True, shape=list(images.shape), dtype=str(images.dtype).replace("torch.", ""),
                          build_and_2_batches_s=round(time.perf_counter() - t0, 2))
            del loader, images, labels
        except Exception as e:  # one graph's failure must not hide the others'
            record.update(ok=False, error=one_line(e))
        free_device(plan.device)
        yield record
    eval_cfg = base.replace(shard_dir=val)
    for label, other, kind in ((f"DALI {plan.device} vs DALI cpu", eval_cfg.replace(device="cpu"), "dali"),
                               (f"DALI {plan.device} vs reference (Pillow, cpu)", eval_cfg.replace(device="cpu"),
                                "reference")):
        record = {"compare": label}
        try:
            record.update(pixel_difference(eval_cfg, "dali", other, kind))
        except Exception as e:
            record["error"] = one_line(e)
        yield record


def summary_graphs(details: list[dict], plan: Plan) -> dict:
    graphs = [d for d in details if "graph" in d]
    ok = [d for d in graphs if d.get("ok")]
    pixels = next((d for d in details if d.get("compare", "").endswith("DALI cpu")), {})
    ref = next((d for d in details if "reference" in d.get("compare", "")), {})
    figure = f"{len(ok)}/4 graphs ran"
    if "mean_abs_levels" in pixels:
        figure += (f"; eval pixels vs CPU decode: mean {pixels['mean_abs_levels']:.3f} levels (worst image "
                   f"{pixels['worst_image_mean_levels']:.2f}, {pixels['images']} images)")
    if "mean_abs_levels" in ref:
        figure += f"; vs reference loader: mean {ref['mean_abs_levels']:.3f}"
    failed = [f"{d['graph']}: {d.get('error', '')}" for d in graphs if not d.get("ok")]
    if failed or "error" in pixels:
        figure += "; " + "; ".join(failed + ([f"pixels: {pixels['error']}"] if "error" in pixels else []))
    passed = len(ok) == 4 and pixels.get("mean_abs_levels", math.inf) <= PIXEL_GOAL
    return {"figure": figure, "goal": f"4/4 graphs; mean abs. diff. <= {PIXEL_GOAL:g} level", "passed": passed}


# ---------------------------------------------------------------------------------------- b: loader alone

def loader_rate(cfg, warmup: int, batches: int) -> dict:
    """Steady images/s inside one epoch: ``warmup`` batches (pipeline build, shuffle-buffer fill) untimed,
    then up to ``batches`` timed, stopping before the last ``prefetch`` batches, where the loader starts
    building the next epoch's pipeline (a cost a full ImageNet epoch amortises)."""
    from pipeline import make_train_loader
    t0 = time.perf_counter()
    loader = make_train_loader(cfg)
    timed = min(batches, len(loader) - warmup - cfg.prefetch)
    if timed < 1:
        raise ValueError(f"{cfg.shard_dir}: {len(loader)} batches per epoch, too few for {warmup} warm-up + 1 timed")
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    sync(cfg.device)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(timed):
        images, labels = next(it)
    sync(cfg.device)
    elapsed = time.perf_counter() - t1
    it.close()
    return {"images_per_s": round(timed * cfg.batch_size / elapsed, 1), "timed_batches": timed,
            "startup_s": round(startup, 2)}


def step_loader(ctx: Ctx):
    plan = ctx.plan
    for shards in ("train_small", "train_full"):   # the goal is on the small shards: measure them first
        for hw in plan.hw_loads:
            for threads in plan.threads:
                record = {"shards": shards, "hw_decoder_load": hw, "threads": threads, "batch": plan.loader_batch}
                if ctx.left() < 8:
                    record["status"] = "skipped (step budget)"
                else:
                    cfg = loader_config(plan, ctx.data / shards, batch_size=plan.loader_batch, num_threads=threads,
                                        hw_decoder_load=hw)
                    try:
                        record.update(loader_rate(cfg, plan.loader_warmup, plan.loader_batches), status="ok")
                    except Exception as e:
                        record["status"] = f"failed: {one_line(e)}"
                    free_device(plan.device)
                yield record


def best_loader(details: list[dict], shards: str) -> dict | None:
    ok = [d for d in details if d.get("shards") == shards and d.get("status") == "ok"]
    return max(ok, key=lambda d: d["images_per_s"]) if ok else None


def summary_loader(details: list[dict], plan: Plan) -> dict:
    small, full = best_loader(details, "train_small"), best_loader(details, "train_full")

    def show(d):
        return f"{d['images_per_s']:,.0f} img/s (hw {d['hw_decoder_load']:g}, {d['threads']} threads)" if d else "none"
    bad = [d for d in details if d.get("status") != "ok"]
    figure = f"shorter-256 shards: {show(small)}; full-size: {show(full)}"
    if bad:
        figure += f"; {len(bad)} of {len(details)} configs not ok ({bad[0].get('status', '')[:80]})"
    if plan.cuda:
        passed = small is not None and small["images_per_s"] >= LOADER_GOAL
    else:
        passed = not bad and small is not None and full is not None
    return {"figure": figure, "goal": f">= {LOADER_GOAL:,} img/s from shorter-256 shards" + ("" if plan.cuda else
            " (GPU only; dry: every config runs)"), "passed": passed}


# ---------------------------------------------------------------------------------------- c: training

def train_rate(step_fn, batches, warmup: int, steps: int, device: str) -> dict:
    """images/s of ``steps`` training steps after ``warmup`` (compilation, pipeline fill) ones, and where the host
    spent each timed step: inside ``next(batches)`` (waiting for the loader) or inside ``step_fn`` (queueing the
    step, or blocked by a synchronisation in it); perf_counter only, no added device syncs."""
    for _ in range(warmup):
        step_fn(*next(batches))
    sync(device)
    t0, images, in_next, in_step = time.perf_counter(), 0, 0.0, 0.0
    for _ in range(steps):
        t1 = time.perf_counter()
        x, y = next(batches)
        t2 = time.perf_counter()
        loss = step_fn(x, y)
        in_step += time.perf_counter() - t2
        in_next += t2 - t1
        images += y.shape[0]
    sync(device)
    elapsed = time.perf_counter() - t0
    loss = float(loss.detach())
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss {loss}")
    return {"images_per_s": round(images / elapsed, 1), "ms_per_step": round(1000 * elapsed / steps, 2),
            "timed_steps": steps, "loss": round(loss, 4), "host_next_ms": round(1000 * in_next / steps, 2),
            "host_step_ms": round(1000 * in_step / steps, 2)}


def memory_figures(device: str) -> dict:
    """The torch allocator's peak since the last reset, and what the whole device has in use (DALI included)."""
    import torch
    if not device.startswith("cuda"):
        return {"peak_torch_gib": None, "device_used_gib": None}
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return {"peak_torch_gib": round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**30, 2),
            "device_used_gib": round((total - free) / 2**30, 2)}


def training_loader_settings(ctx: Ctx) -> dict:
    """The loader settings for c and d: b's fastest on the small shards, else the plan's default."""
    best = best_loader(ctx.details("b"), "train_small")
    if best:
        return {"num_threads": best["threads"], "hw_decoder_load": best["hw_decoder_load"], "from": "b's best"}
    return {"num_threads": ctx.plan.train_threads, "hw_decoder_load": None, "from": "default (b gave none)"}


# c's diagnostics, at synthetic's best compiled batch, each a row of its own (``source``): the loader alone
# (this run's baseline for "synthetic + loader"); DALI-fed with training on a side stream (a serialisation
# through the legacy default stream); the same with DALI's batches bound to that stream instead of waited for on
# the host; DALI-fed with hw_decoder_load 0 (the hardware decoder's part). DALI-fed rows say where the host spent
# each step (host_next_ms, host_step_ms).
LOADER_ALONE, SIDE_STREAM, SIDE_BOUND, HW_OFF = ("loader alone", "loader, side stream",
                                                 "loader, side stream, outputs bound", "loader, hw_decoder_load 0")
DIAGNOSTICS_NEED_S = 30   # four loader runs of about 4-5 s each on the H200, with room


@dataclass
class TrainingSetup:
    """One (batch, compile) config: its record fields, training step and synthetic batch."""
    base: dict
    step_fn: object
    x: object
    y: object


def training_setup(plan: Plan, cfg, batch: int, compiled: bool) -> TrainingSetup:
    import torch
    import torch.nn as nn

    from trainer.loop import gated_step, train_step
    from trainer.model import AlexNet
    from trainer.schedule import make_optimizer

    device = torch.device(plan.device)
    if plan.cuda:
        torch.empty(1, device=device)   # the allocator exists only once something is on the device
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    net = AlexNet(plan.model_classes, width=plan.width, image_size=plan.crop, init="kaiming")
    net = net.to(device).to(memory_format=torch.channels_last)
    # one static graph per batch size, as a training run compiles its one batch size
    model = torch.compile(net, dynamic=False, backend=plan.compile_backend) if compiled else net
    optimizer = make_optimizer(net, cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    def step_fn(images, labels):
        loss, _ = train_step(model, images, labels, optimizer=optimizer, criterion=criterion,
                             grad_clip=cfg.optim.grad_clip, bf16=True)
        gated_step(optimizer, None)
        return loss

    x = torch.randn(batch, 3, plan.crop, plan.crop, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, plan.model_classes, (batch,), device=device)
    base = {"batch": batch, "compile": plan.compile_backend if compiled else False, "precision": "bf16",
            "layout": "channels_last"}
    return TrainingSetup(base=base, step_fn=step_fn, x=x, y=y)


def fed_rate(plan: Plan, setup: TrainingSetup, lcfg, *, stream: str = "default", bound: bool = False) -> dict:
    """DALI-fed images/s of ``setup``, inside one epoch clear of its last ``prefetch`` steps (the next epoch's
    build: see loader_rate); ``stream``: trainer/parallelize.py training_stream; ``bound``: the loader's
    ``outputs_to_stream``."""
    import torch

    from pipeline import make_train_loader
    from trainer.parallelize import training_stream

    loader = make_train_loader(lcfg.replace(batch_size=setup.base["batch"]))
    loader.outputs_to_stream = bound
    steps = min(plan.train_steps, len(loader) - plan.train_warmup - lcfg.prefetch)
    if steps < 1:
        raise ValueError(f"{lcfg.shard_dir}: {len(loader)} batches of {setup.base['batch']} per epoch, too few")
    it = iter(loader)
    try:
        with training_stream(stream, torch.device(plan.device)):   # the loader hands over on the current stream
            return train_rate(setup.step_fn, it, plan.train_warmup, steps, plan.device)
    finally:
        it.close()


def timed_record(plan: Plan, record: dict, measure) -> dict:
    """``record`` with ``measure()``'s figures, or the one-line reason it failed; its seconds and memory."""
    t0 = time.perf_counter()
    try:
        record.update(measure(), status="ok")
    except Exception as e:   # an OOM or a compile failure: say so, go on with the next one
        record["status"] = f"failed: {one_line(e)}"
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record.update(memory_figures(plan.device))
    return record


def training_diagnostics(ctx: Ctx, setup: TrainingSetup, lcfg):
    """The rows that tell apart why DALI-fed steps take synthetic's time plus the loader's (see LOADER_ALONE)."""
    plan, batch = ctx.plan, setup.base["batch"]
    runs = [(LOADER_ALONE, lambda: loader_alone(plan, lcfg.replace(batch_size=batch))),
            (SIDE_STREAM, lambda: fed_rate(plan, setup, lcfg, stream="side")),
            (SIDE_BOUND, lambda: fed_rate(plan, setup, lcfg, stream="side", bound=True)),
            (HW_OFF, lambda: fed_rate(plan, setup, lcfg.replace(hw_decoder_load=0.0)))]
    for source, measure in runs:
        record = {**setup.base, "source": source}
        if ctx.left() < 8:
            record["status"] = f"skipped (step budget: {ctx.left():.0f} s left)"
            yield record
            continue
        yield timed_record(plan, record, measure)
        free_device(plan.device)


def loader_alone(plan: Plan, cfg) -> dict:
    """loader_rate with c's warm-up and step count, in c's units (ms per batch as ms_per_step)."""
    rate = loader_rate(cfg, plan.train_warmup, plan.train_steps)
    return {**rate, "ms_per_step": round(1000 * cfg.batch_size / rate["images_per_s"], 2)}


def step_training(ctx: Ctx):
    from trainer.config import modern_preset

    plan = ctx.plan
    cfg = modern_preset()
    cfg.model.width, cfg.data.image_size = plan.width, plan.crop
    settings = training_loader_settings(ctx)
    yield {"loader_settings": settings}
    lcfg = loader_config(plan, ctx.data / "train_small", layout="NHWC", dtype="float32", crop="paper",
                         num_threads=settings["num_threads"], hw_decoder_load=settings["hw_decoder_load"])
    configs = ([(b, False) for b in plan.train_batches] + [(b, True) for b in plan.compile_batches]
               + [(b, True) for b in plan.late_compile_batches])
    diagnose_before = len(plan.train_batches) + len(plan.compile_batches)   # the late configs come after
    compiled_before = False
    best = None   # (synthetic images/s, setup) of the fastest compiled config so far: the diagnostics' model
    for k, (batch, compiled) in enumerate(configs):
        if k == diagnose_before:
            yield from diagnose(ctx, best, lcfg)
            best = None
            release_compiled(plan.device)
        need = (60 if not compiled_before else 40) if compiled else 10
        if ctx.left() < need:
            for source in ("synthetic", "loader"):
                yield {"batch": batch, "compile": plan.compile_backend if compiled else False, "precision": "bf16",
                       "layout": "channels_last", "source": source,
                       "status": f"skipped (step budget: {ctx.left():.0f} s left)"}
            continue
        setup = training_setup(plan, cfg, batch, compiled)
        synthetic = timed_record(plan, {**setup.base, "source": "synthetic"}, lambda: train_rate(
            setup.step_fn, iter(lambda: (setup.x, setup.y), None), plan.train_warmup, plan.train_steps, plan.device))
        yield synthetic
        yield timed_record(plan, {**setup.base, "source": "loader"}, lambda: fed_rate(plan, setup, lcfg))
        compiled_before = compiled_before or compiled
        if compiled and k < diagnose_before and synthetic.get("status") == "ok" and (
                best is None or synthetic["images_per_s"] > best[0]):
            best = (synthetic["images_per_s"], setup)   # kept alive (and compiled) for the diagnostics
        setup = None
        if compiled and k >= diagnose_before:
            release_compiled(plan.device)
        free_device(plan.device)
    if diagnose_before == len(configs):
        yield from diagnose(ctx, best, lcfg)
    best = None
    release_compiled(plan.device)


def diagnose(ctx: Ctx, best: tuple | None, lcfg):
    """training_diagnostics on the fastest compiled config, when one ran and the budget allows."""
    if best is None:
        return
    setup = best[1]
    if ctx.left() < DIAGNOSTICS_NEED_S:
        for source in (LOADER_ALONE, SIDE_STREAM, SIDE_BOUND, HW_OFF):
            yield {**setup.base, "source": source, "status": f"skipped (step budget: {ctx.left():.0f} s left)"}
        return
    yield from training_diagnostics(ctx, setup, lcfg)


def release_compiled(device: str) -> None:
    """Drop torch.compile's graphs (they hold on to their models' tensors) and the freed memory."""
    import torch
    torch._dynamo.reset()
    free_device(device)


def training_pairs(details: list[dict]) -> list[dict]:
    """(batch, compile) configs where both sources ran: their figures and loader / synthetic."""
    ok = {(d["batch"], d["compile"], d["source"]): d for d in details if d.get("status") == "ok"}
    pairs = []
    for (batch, compiled, source), d in ok.items():
        if source == "synthetic" and (batch, compiled, "loader") in ok:
            fed = ok[(batch, compiled, "loader")]
            pairs.append({"batch": batch, "compile": compiled, "synthetic": d["images_per_s"],
                          "loader": fed["images_per_s"], "ratio": fed["images_per_s"] / d["images_per_s"]})
    return pairs


def diagnostics_line(details: list[dict]) -> str:
    """"; at 512c, ms/step: synthetic 29.4 + loader alone 20.1 = 49.5; fed 48.6 (host in next 18.0, in step 2.1);
    side stream ...; side stream, outputs bound ...; hw_decoder_load 0 ...": c's diagnostics in one line."""
    diag = next((d for d in details if d.get("source") == LOADER_ALONE), None)
    if diag is None:
        return ""
    at = (diag["batch"], diag["compile"])
    rows = {d["source"]: d for d in details if (d.get("batch"), d.get("compile")) == at and "source" in d}

    def ms(source: str) -> str:
        d = rows.get(source, {})
        if d.get("status") != "ok":
            return f"{source} {(d.get('status') or 'missing')[:40]}"
        host = f" (host in next {d['host_next_ms']:g}, in step {d['host_step_ms']:g})" if "host_next_ms" in d else ""
        return f"{source} {d['ms_per_step']:g}{host}"
    parts = [ms(source) for source in ("synthetic", LOADER_ALONE, "loader", SIDE_STREAM, SIDE_BOUND, HW_OFF)]
    syn, alone = rows.get("synthetic", {}), rows.get(LOADER_ALONE, {})
    if syn.get("status") == alone.get("status") == "ok":
        parts[1] += f" (sum {syn['ms_per_step'] + alone['ms_per_step']:.2f})"
    return f"; at {at[0]}{'c' if at[1] else 'e'}, ms/step: " + ", ".join(parts)


def summary_training(details: list[dict], plan: Plan) -> dict:
    pairs = training_pairs(details)
    runs = [d for d in details if "source" in d]
    bad = [d for d in runs if d.get("status") != "ok"]
    goal = f"loader / synthetic >= {TRAIN_RATIO_GOAL:g} at synthetic's best config"
    if not pairs:
        return {"figure": "no config ran on both sources" + (f" ({bad[0]['status'][:100]})" if bad else ""),
                "goal": goal, "passed": False}
    best = max(pairs, key=lambda p: p["synthetic"])
    figure = (f"best: batch {best['batch']} {'compiled' if best['compile'] else 'eager'}: synthetic "
              f"{best['synthetic']:,.0f}, loader {best['loader']:,.0f} img/s, ratio {best['ratio']:.2f}; "
              f"ratios " + ", ".join(f"{p['batch']}{'c' if p['compile'] else 'e'} {p['ratio']:.2f}" for p in pairs))
    figure += diagnostics_line(details)
    if bad:
        figure += f"; {len(bad)} of {len(runs)} runs not ok ({bad[0]['status'][:80]})"
    passed = best["ratio"] >= TRAIN_RATIO_GOAL if plan.cuda else not bad
    return {"figure": figure, "goal": goal + ("" if plan.cuda else " (GPU only; dry: every config runs)"),
            "passed": passed}


# ---------------------------------------------------------------------------------------- d: fit + eval

class GpuMemoryPeak:
    """The device's peak memory.used while the block runs, sampled by ``nvidia-smi -lms`` (another
    process's CUDA context, such as a Ray Train worker's, is invisible to this process's torch)."""

    def __init__(self, device: str):
        self.device, self.samples_mib, self._proc = device, [], None

    def __enter__(self):
        if self.device.startswith("cuda") and shutil.which("nvidia-smi"):
            index = self.device.split(":")[1]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
            if visible[0].strip().isdigit():
                index = visible[int(index)].strip()
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                           "-i", index, "-lms", "250"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples_mib.append(int(line))

    def __exit__(self, *exc) -> None:
        if self._proc:
            self._proc.terminate()
            self._proc.wait()

    def figures(self) -> dict:
        if not self.samples_mib:
            return {"peak_gpu_used_gib": None, "idle_gpu_used_gib": None}
        return {"peak_gpu_used_gib": round(max(self.samples_mib) / 1024, 2),
                "idle_gpu_used_gib": round(self.samples_mib[0] / 1024, 2)}


_CHILDREN: set[int] = set()   # sessions started by run_command, killed with this process (see run_step)


def kill_session(pid: int) -> None:
    """SIGTERM to a child's whole session (a fit's Ray helpers too), SIGKILL to what is left 5 s later."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_command(cmd: list[str], timeout: float) -> tuple[int, list[str]]:
    """Run ``cmd`` in its own session, echo its output, return (exit status, output lines); past ``timeout``
    the whole session is killed (Ray's helpers included) and the status is 124, as with timeout(1)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _CHILDREN.add(proc.pid)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        proc.wait()
        rc = 124
    kill_session(proc.pid)   # helpers the command left behind in its session
    _CHILDREN.discard(proc.pid)
    reader.join(timeout=5)
    return rc, lines


def step_fit(ctx: Ctx):
    from shards.manifest import load_manifest

    plan = ctx.plan
    run = ctx.work / "fit_run"
    shutil.rmtree(run, ignore_errors=True)
    settings = training_loader_settings(ctx)
    fit = [sys.executable, "-m", "trainer", "fit", "--train", str(ctx.data / "train_full"),
           "--val", str(ctx.data / "val"), "--out", str(run), "--preset", "modern", "--workers", "1",
           "--gpus-per-worker", "1" if plan.cuda else "0", "--epochs", "2", "--batch-size", str(plan.fit_batch),
           "--width", str(plan.width), "--set", f"data.image_size={plan.crop}",
           "--set", f"train.max_steps_per_epoch={plan.fit_steps}",
           "--set", f"data.num_threads={settings['num_threads']}",
           "--set", "train.log_every=5",
           "--set", "run.max_failures=0",      # a failure ends the check instead of being retried
           # c measures torch.compile; its minute of compiling does not fit here. Quoted: YAML reads off as False
           "--set", "train.compile='off'"]
    eval_reserve = 40
    t0 = time.perf_counter()
    with GpuMemoryPeak(plan.device) as memory:
        rc, _ = run_command(fit, ctx.left() - eval_reserve)
    epochs = read_jsonl(run / "metrics.jsonl")
    yield {"command": "fit", "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "epochs": len(epochs),
           "steps_per_epoch": plan.fit_steps, "global_batch": plan.fit_batch, "num_threads": settings["num_threads"],
           "last_images_per_s": round(epochs[-1]["images_per_s"], 1) if epochs else None,
           "val_top1": round(epochs[-1]["val_top1"], 4) if epochs else None,
           "train_loss": [round(e["train_loss"], 4) for e in epochs], "best_pt": (run / "best.pt").is_file(),
           **memory.figures()}
    if not (run / "best.pt").is_file():
        return
    t1 = time.perf_counter()
    rc, lines = run_command([sys.executable, "-m", "trainer", "eval", "--checkpoint", str(run / "best.pt"),
                             "--data", str(ctx.data / "val")], ctx.left() - 6)
    result = next((json.loads(ln) for ln in reversed(lines) if ln.startswith("{") and '"top1"' in ln), {})
    yield {"command": "eval", "rc": rc, "seconds": round(time.perf_counter() - t1, 1), **result,
           "expected_n": load_manifest(ctx.data / "val")["num_samples"]}
    shutil.rmtree(run, ignore_errors=True)   # checkpoints of the full net: hundreds of MB


def summary_fit(details: list[dict], plan: Plan) -> dict:
    fit = next((d for d in details if d.get("command") == "fit"), {})
    ev = next((d for d in details if d.get("command") == "eval"), {})
    figure = (f"fit exit {fit.get('rc')}: {fit.get('epochs', 0)} epochs x {plan.fit_steps} steps in "
              f"{fit.get('seconds', '?')} s, last epoch {fit.get('last_images_per_s')} img/s, val top-1 "
              f"{fit.get('val_top1')}") if fit else "fit did not finish"
    figure += (f"; eval exit {ev.get('rc')}: n {ev.get('n')}/{ev.get('expected_n')}, top-1 {ev.get('top1')}"
               if ev else "; no eval")
    losses = fit.get("train_loss") or []
    passed = (fit.get("rc") == 0 and fit.get("epochs") == 2 and fit.get("best_pt") is True
              and all(math.isfinite(x) for x in losses) and ev.get("rc") == 0 and ev.get("n") == ev.get("expected_n"))
    return {"figure": figure, "goal": "2 epochs, best.pt, eval counts every val image", "passed": passed}


# ---------------------------------------------------------------------------------------- e: split

def step_split(ctx: Ctx):
    results = ctx.out / "steps" / "e_split.jsonl"
    rc, _ = run_command([sys.executable, "bench/split.py", *ctx.plan.split_args, "--json", str(results)],
                        ctx.left() - 6)
    yield {"command": "bench/split.py " + " ".join(ctx.plan.split_args), "rc": rc}
    yield from read_jsonl(results)


def summary_split(details: list[dict], plan: Plan) -> dict:
    checks = [d for d in details if d.get("check") == "equivalence"]
    timing = next((d for d in details if d.get("check") == "step_time"), {})
    rc = next((d["rc"] for d in details if "rc" in d), None)
    parts = [f"equivalence {'ok' if checks and all(c['ok'] for c in checks) else 'FAILED'}"
             + "".join(f" ({'+'.join(c['devices'])}: fwd {c['forward_rel_err']:.1e}, grad {c['max_grad_rel_err']:.1e})"
                       for c in checks)]
    if timing:
        ms = timing["median_step_ms"]
        parts.append(", ".join(f"{k} {ms[k]:.1f} ms ({timing['ratio_vs_single'][k]:.2f}x)" for k in ms))
    passed = rc == 0 and bool(checks) and all(c["ok"] for c in checks) and bool(timing)
    return {"figure": "; ".join(parts), "goal": "split == single (rel. err < 1e-4); step-time ratio reported",
            "passed": passed}


# ---------------------------------------------------------------------------------------- f: memory

def step_memory(ctx: Ctx):
    training = [d for d in ctx.details("c") if d.get("status") == "ok"]
    fit = next((d for d in ctx.details("d") if d.get("command") == "fit"), None)
    if training:
        peak = max(training, key=lambda d: d["peak_torch_gib"] or 0)
        yield {"source": "c", "batch": peak["batch"], "compile": peak["compile"], "from": peak["source"],
               "peak_torch_gib": peak["peak_torch_gib"], "device_used_gib": peak["device_used_gib"]}
    if fit:
        yield {"source": "d", "peak_gpu_used_gib": fit.get("peak_gpu_used_gib"),
               "idle_gpu_used_gib": fit.get("idle_gpu_used_gib")}


def summary_memory(details: list[dict], plan: Plan) -> dict:
    c = next((d for d in details if d.get("source") == "c"), None)
    d = next((d for d in details if d.get("source") == "d"), None)
    parts = []
    if not plan.cuda:
        ran = {k: "ran" if v else "left no figures" for k, v in (("c", c), ("d", d))}
        parts.append(f"no GPU memory on the CPU; c {ran['c']}, d {ran['d']}")
    elif c:
        parts.append(f"c: {c['peak_torch_gib']} GiB torch peak (batch {c['batch']}, "
                     f"{'compiled' if c['compile'] else 'eager'}), device {c['device_used_gib']} GiB with DALI")
    if d and plan.cuda:
        parts.append(f"d: {d['peak_gpu_used_gib']} GiB device peak (nvidia-smi, idle {d['idle_gpu_used_gib']})")
    figure = "; ".join(parts) or "c and d left no figures"
    measured = c is not None and d is not None
    if plan.cuda:
        measured = measured and c["peak_torch_gib"] is not None and d["peak_gpu_used_gib"] is not None
    return {"figure": figure, "goal": "both measured", "passed": measured}


# ---------------------------------------------------------------------------------------- running, rows, report

RUNNERS = {"data": step_data, "a": step_graphs, "b": step_loader, "c": step_training, "d": step_fit,
           "e": step_split, "f": step_memory}
SUMMARIES = {"data": summary_data, "a": summary_graphs, "b": summary_loader, "c": summary_training,
             "d": summary_fit, "e": summary_split, "f": summary_memory}


def run_step(step: str, ctx: Ctx) -> int:
    """Append the step's detail records as they come; an exception becomes one more record and exit 1."""
    import signal

    def on_term(signum, frame):   # timeout(1) ends the step: end the sessions it started with it
        for pid in list(_CHILDREN):
            kill_session(pid)
        sys.exit(124)
    signal.signal(signal.SIGTERM, on_term)
    path = ctx.out / "steps" / f"{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with open(path, "a") as f:
        try:
            for record in RUNNERS[step](ctx):
                f.write(json.dumps(record) + "\n")
                f.flush()
                print(f"[{step}] {json.dumps(record)}", flush=True)
        except Exception as e:
            f.write(json.dumps({"error": one_line(e)}) + "\n")
            import traceback
            traceback.print_exc()
            return 1
    return 0


def settle(step: str, out: Path, plan: Plan, rc: int, seconds: float, budget: float) -> dict:
    """The step's row: its summary of whatever details it wrote, and how it ended."""
    details = read_jsonl(out / "steps" / f"{step}.jsonl")
    try:
        summary = SUMMARIES[step](details, plan)
    except Exception as e:   # details cut short by a kill: say so rather than lose the row
        summary = {"figure": f"(no summary: {one_line(e)})", "goal": "", "passed": False}
    if rc == 0:
        status = "ok"
    elif rc in (124, 137):
        status = f"timed out after {budget:g} s"
    else:
        errors = [d["error"] for d in details if "error" in d]
        status = f"exit {rc}" + (f": {errors[-1]}" if errors else "")
    row = {"step": step, "what": WHAT[step], "figure": summary["figure"], "goal": summary["goal"],
           "pass": bool(summary["passed"] and rc == 0), "status": status, "seconds": round(seconds, 1),
           "budget_s": budget, "device": plan.device, "dry": plan.dry, "details": details}
    (out / "steps" / f"{step}.row.json").write_text(json.dumps(row) + "\n")
    return row


def environment() -> dict:
    import importlib.metadata as md
    import platform
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
           "cpus": cpus(), "python": platform.python_version()}
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in ("torch", "ray", "webdataset") or name.startswith("nvidia-dali"):
            env[name] = dist.version
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        env["gpu"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else "none"
    return env


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "/").replace("\n", " ")[:160]


def report(out: Path, plan: Plan) -> str:
    rows = []
    for step in STEPS:
        path = out / "steps" / f"{step}.row.json"
        rows.append(json.loads(path.read_text()) if path.is_file() else
                    {"step": step, "what": WHAT[step], "figure": "", "goal": "", "pass": False, "status": "not run",
                     "seconds": 0, "budget_s": 0, "device": plan.device, "dry": plan.dry, "details": []})
    env = environment()
    total = sum(r["seconds"] for r in rows)
    lines = [f"# GPU check{' (dry run on the CPU: checks the script, not the speed)' if plan.dry else ''}", "",
             ", ".join(f"{k} {v}" for k, v in env.items()) + f"; device {plan.device}; steps took {total:.0f} s "
             f"(budgets {sum(r['budget_s'] for r in rows):g} s)", "",
             "| step | what | figure | goal | result | s (budget) |", "|---|---|---|---|---|---|"]
    for r in rows:
        result = "pass" if r["pass"] else f"FAIL ({r['status']})" if r["status"] != "ok" else "FAIL (goal)"
        lines.append(f"| {r['step']} | {_cell(r['what'])} | {r['figure'].replace('|', '/')} | {_cell(r['goal'])} | "
                     f"{result} | {r['seconds']:g} ({r['budget_s']:g}) |")
    table = "\n".join(lines)
    details = ["", "## Details", ""]
    for r in rows:
        if not r["details"]:
            continue
        keys = list(dict.fromkeys(k for d in r["details"] for k in d))
        details += [f"### {r['step']}: {r['what']}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        details += ["| " + " | ".join(_cell(d.get(k, "")) for k in keys) + " |" for d in r["details"]]
        details.append("")
    write_text(out / "gpu_check.md", table + "\n" + "\n".join(details) + "\n")
    write_text(out / "gpu_check.jsonl", "".join(json.dumps({**r, "env": env}) + "\n" for r in rows))
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["step", "settle", "report"])
    p.add_argument("step", nargs="?", choices=STEPS)
    p.add_argument("--out", type=Path, required=True, help="OUTDIR: the results")
    p.add_argument("--data", type=Path, help="shards (kept for reruns; default TMPDIR/gpu_check_data/{gpu,dry})")
    p.add_argument("--work", type=Path, help="scratch for the fit's run (default TMPDIR/gpu_check_work)")
    p.add_argument("--dry", action="store_true", help="the CPU plan: device cpu, tiny sizes")
    p.add_argument("--budget", type=float, default=60, help="this step's time budget, seconds")
    p.add_argument("--rc", type=int, default=0, help="settle: the step's exit status")
    p.add_argument("--seconds", type=float, default=0, help="settle: how long the step ran")
    args = p.parse_args(argv)
    plan = make_plan(args.dry)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    data = args.data or tmp / "gpu_check_data" / ("dry" if args.dry else "gpu")
    work = args.work or tmp / ("gpu_check_work_dry" if args.dry else "gpu_check_work")
    if args.command != "report" and not args.step:
        p.error(f"{args.command} needs a step: one of {', '.join(STEPS)}")
    if args.command == "step":
        work.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(plan=plan, out=args.out, data=data, work=work, deadline=time.monotonic() + args.budget - 3)
        return run_step(args.step, ctx)
    if args.command == "settle":
        row = settle(args.step, args.out, plan, args.rc, args.seconds, args.budget)
        print(f"== {row['step']}: {'pass' if row['pass'] else 'FAIL'} ({row['status']}, {row['seconds']:g} s): "
              f"{row['figure']}", flush=True)
        return 0
    print(report(args.out, plan), flush=True)
    rows = read_jsonl(args.out / "gpu_check.jsonl")
    return 0 if rows and all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
