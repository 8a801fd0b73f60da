"""`python -m trainer fit`: Ray Train data-parallel training of AlexNet.

The driver (:func:`fit`) joins or starts a Ray cluster and runs a ``TorchTrainer`` whose workers each run
:func:`train_worker`: build the model and this rank's loaders on the device Ray assigned, restore the
last checkpoint if there is one, then per epoch train, validate over exactly the val set (masked counts,
all-reduced), and report a checkpoint. Rank 0 also writes RUN_DIR/metrics.jsonl, TensorBoard events,
curves.png, last.pt and best.pt.

Faults (README "Reliability"): with ``train.checkpoint_every N`` a checkpoint is also reported every N steps
inside an epoch, holding every rank's loader position (DALI pipeline checkpoint), RNG states and running
loss, so a group Ray Train restarts (``run.max_failures``) continues exactly where the checkpoint was taken.
A NaN/inf loss or gradient stops the run (no retry, nothing saved from that step) or, with
``train.skip_nonfinite``, skips the step. ``fault.*`` injects real failures (trainer/faults.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer import checkpoint as ckpt
from trainer import faults
from trainer.config import Config, config_from_dict
from trainer.metrics import MetricsLog, topk_correct
from trainer.model import AlexNet
from trainer.schedule import make_optimizer, make_scheduler

RAY_SUBDIR = "ray"
STOPPED = "stopped.txt"   # why a run stopped on purpose (written by rank 0, read by the driver)


# ---------------------------------------------------------------------------------------- pieces

def say(message: str) -> None:
    """One progress line. Written to stdout directly: Ray Train's patched print() would log it twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def build_model(cfg: Config, num_classes: int) -> AlexNet:
    return AlexNet(num_classes, width=cfg.model.width, dropout=cfg.model.dropout, init=cfg.model.init,
                   image_size=cfg.data.image_size)


def loader_config(cfg: Config, shard_dir: str, rank: int, world_size: int, device: torch.device,
                  batch_size: int, ten_crop: bool = False):
    from pipeline import LoaderConfig

    return LoaderConfig(shard_dir=shard_dir, batch_size=batch_size, rank=rank, world_size=world_size,
                        device=str(device), seed=cfg.train.seed, crop=cfg.data.crop, lighting=cfg.data.lighting,
                        flip=cfg.data.flip, image_size=cfg.data.image_size,
                        resize_shorter=cfg.data.shorter_side(),
                        layout="NHWC" if cfg.use_channels_last() else "NCHW", dtype="float32",
                        num_threads=cfg.data.num_threads, num_workers=cfg.data.num_threads, ten_crop=ten_crop)


def autocast(cfg: Config, device: torch.device):
    if cfg.use_bf16():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (float64, so image counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate_counts(model: torch.nn.Module, loader, device: torch.device, cfg: Config,
                    ten_crop: bool = False) -> dict[str, float]:
    """Summed (not averaged) loss, top-1 and top-5 hits and image count over this rank's masked rows.

    With ``ten_crop`` the loader yields (B, 10, C, H, W); the softmax of the 10 patches is averaged
    (section 4.1)."""
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = n = 0.0
    for images, labels, mask in loader:
        images, labels, mask = images.to(device), labels.to(device), mask.to(device)
        with autocast(cfg, device):
            if ten_crop:
                b, crops = images.shape[:2]
                logits = model(images.flatten(0, 1)).float()
                probs = logits.softmax(dim=1).view(b, crops, -1).mean(dim=1)
            else:
                probs = model(images).float().softmax(dim=1)
        hits = topk_correct(probs, labels, mask)
        top1, top5 = top1 + hits[1], top5 + hits[5]
        n += int(mask.sum())
        loss_sum += float(F.nll_loss(probs[mask].clamp_min(1e-12).log(), labels[mask], reduction="sum")) \
            if mask.any() else 0.0
    model.train(was_training)
    return {"loss_sum": loss_sum, "top1": top1, "top5": top5, "n": n}


def model_file(model: torch.nn.Module, cfg: Config, classes: list[str], record: dict[str, Any]) -> dict:
    """The plain model file (last.pt / best.pt): state dict + what eval/predict need to rebuild it."""
    return {"model": ckpt.plain_state_dict(model),
            "meta": {"classes": list(classes), "width": cfg.model.width, "dropout": cfg.model.dropout,
                     "image_size": cfg.data.image_size, "resize_shorter": cfg.data.shorter_side(),
                     "preset": cfg.preset, "epoch": record["epoch"],
                     "val_top1": record["val_top1"], "val_top5": record["val_top5"]}}


def gather(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rng_states() -> list[dict]:
    """Every rank's RNG states, in rank order (dropout masks differ per rank, so each is kept)."""
    return gather(ckpt.rng_state())


def nonfinite_step(loss: torch.Tensor, grad_norm: torch.Tensor, device: torch.device) -> tuple[bool, float, float]:
    """Whether any rank's loss or the (all-reduced) gradients are NaN/inf: (bad, summed loss, grad norm).

    The gradient norm is taken after DDP's all-reduce, so it is the same on every rank, and the losses are
    summed over ranks: every rank reaches the same verdict and they stop or skip together."""
    loss_total, norm = all_reduce_sum([float(loss.detach()), float(grad_norm)], device)
    return not (math.isfinite(loss_total) and math.isfinite(norm)), loss_total, norm


def report_checkpoint(rank: int, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Every rank reports; rank 0 attaches the training state as a Ray Train checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(state, Path(tmp) / ckpt.TRAINING_STATE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def newest_training_state(ray_dir: Path, registered) -> tuple[str | None, dict[str, Any] | None]:
    """The newest checkpoint that loads: a ``checkpoint_*`` directory on the storage path, else Ray's own.

    Ray Train learns of a reported checkpoint by polling its workers, so one reported just before a
    worker died can be on disk yet unknown to the controller, which then hands back an older one (seen on
    a loaded 2-core machine: a restart from scratch instead of from step 3). Rank 0 picks the newest
    directory whose state loads (an upload cut short does not) and every rank loads that one. With remote
    storage (s3://, gs://) nothing is on local disk and Ray's registered checkpoint is used."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    choice, state = None, None
    if rank0:
        for path in sorted(ray_dir.glob("checkpoint_*"), reverse=True) if ray_dir.is_dir() else []:
            try:
                state = ckpt.load(path / ckpt.TRAINING_STATE)   # weights_only: no pickled code runs
            except Exception as error:   # cut short by the failure, or refused: fall back to the one before
                reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
                say(f"[trainer] not resuming from {path}: {reason}")
                continue
            choice = str(path)
            break
        if choice is None and registered is not None:
            choice = "registered"
    choice = gather(choice)[0]
    if choice == "registered":
        with registered.as_directory() as d:
            return registered.path, ckpt.load(Path(d) / ckpt.TRAINING_STATE)
    if choice is not None and state is None:
        state = ckpt.load(Path(choice) / ckpt.TRAINING_STATE)
    return choice, state


def worker_devices(cfg: Config) -> list[torch.device]:
    """The devices Ray Train assigned to this worker (two CPU 'devices' for a CPU model split)."""
    import ray.train.torch

    if cfg.on_gpu():
        devices = ray.train.torch.get_devices()
        torch.cuda.set_device(devices[0])
        return list(devices)
    return [torch.device("cpu")] * (2 if cfg.run.parallel == "model" else 1)


# ---------------------------------------------------------------------------------------- worker

def train_worker(loop_config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    from pipeline import make_eval_loader, make_train_loader
    from torch.nn.parallel import DistributedDataParallel

    cfg: Config = config_from_dict(loop_config["config"])
    classes: list[str] = loop_config["classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    devices = worker_devices(cfg)
    device = devices[0]
    run_dir = Path(cfg.run.out)
    log = say if rank == 0 else (lambda *a, **k: None)

    torch.manual_seed(cfg.train.seed)          # same initial weights on every rank (DDP also broadcasts)
    net = build_model(cfg, len(classes))
    if cfg.run.parallel == "model":
        from trainer.parallel import split_two_devices
        net = split_two_devices(net, devices)   # one column per device (section 3.2)
    else:
        net = net.to(device)
    if cfg.use_channels_last():
        net = net.to(memory_format=torch.channels_last)

    train_dir, val_dir = cfg.data.train, cfg.data.val
    if cfg.data.stage_to:  # one copy per node (local rank 0), the other ranks wait at a barrier
        from shards.stage import stage_once_per_node
        local = stage_once_per_node(cfg.data.stage_to, {"train": train_dir, "val": val_dir}, ctx.get_local_rank())
        train_dir, val_dir = local["train"], local["val"]
    per_rank_batch = cfg.per_worker_batch()
    train_loader = make_train_loader(loader_config(cfg, train_dir, rank, world, device, per_rank_batch),
                                     kind=cfg.data.loader)
    val_loader = make_eval_loader(loader_config(cfg, val_dir, rank, world, device, per_rank_batch),
                                  kind=cfg.data.loader)
    steps = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)

    optimizer = make_optimizer(net, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    start_epoch, start_step, best_top1 = 0, 0, -1.0
    fresh_progress = {"loss_sum": 0.0, "seen": 0, "skipped": 0}   # this rank's share of the epoch so far
    progress = dict(fresh_progress)
    last_saved = "none"

    restored, state = newest_training_state(run_dir / RAY_SUBDIR, ray.train.get_checkpoint())
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_top1 = state["epoch"] + 1, state["best_top1"]
        if len(state["rng"]) == world:
            ckpt.set_rng_state(state["rng"][rank])
        ranks = state.get("ranks")   # set by a mid-epoch checkpoint: every rank's position in the epoch
        if ranks and len(ranks) == world:
            start_step = state["step"]
            progress = {k: ranks[rank][k] for k in fresh_progress}
            train_loader.load_state_dict(ranks[rank]["loader"])
        elif ranks:
            log(f"[trainer] the checkpoint was taken mid-epoch by {len(ranks)} workers, not {world}: "
                f"epoch {start_epoch + 1} restarts from its first batch")
        last_saved = f"epoch {start_epoch}" + (f" + {start_step} steps" if start_step else "")
        if start_epoch < cfg.train.epochs:
            log(f"[trainer] resumed from {restored} at epoch {start_epoch + 1}/{cfg.train.epochs}"
                + (f" step {start_step + 1}/{steps}" if start_step else ""))
    else:
        torch.manual_seed(cfg.train.seed * 1000 + rank + 1)   # per-rank dropout masks

    model = net
    if world > 1:
        ddp_ids = [device] if device.type == "cuda" and cfg.run.parallel == "data" else None
        model = DistributedDataParallel(net, device_ids=ddp_ids)
    if cfg.use_compile():
        model = torch.compile(model)

    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    metrics = MetricsLog(run_dir, start_epoch) if rank == 0 else None
    if start_epoch >= cfg.train.epochs:
        log(f"[trainer] {run_dir} is already trained for {cfg.train.epochs} epochs; nothing to do")

    def training_state(epoch_done: int, step: int, ranks: list | None) -> dict[str, Any]:
        return {"model": ckpt.plain_state_dict(net), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch_done, "best_top1": best_top1,
                "rng": rng_states, "config": cfg.to_dict(), "classes": list(classes),
                "resize_shorter": cfg.data.shorter_side(), "step": step, "ranks": ranks}

    stopped = ""
    for epoch in range(start_epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        first_step = start_step if epoch == start_epoch else 0
        if epoch != start_epoch:
            progress = dict(fresh_progress)
        model.train()
        loss_sum, t0 = torch.tensor(progress["loss_sum"], dtype=torch.float64, device=device), time.perf_counter()
        seen, skipped = progress["seen"], progress["skipped"]
        t_window, window_images = t0, 0
        for step, (images, labels) in enumerate(train_loader, start=first_step):
            if step >= steps:
                break
            global_step = epoch * steps + step + 1
            inject_nan = faults.before_step(cfg, rank, global_step)
            with autocast(cfg, device):
                logits = model(images)
            loss = criterion(logits.float(), labels)
            if inject_nan:
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in net.parameters() if p.grad is not None]
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip) if cfg.optim.grad_clip
                         else torch.nn.utils.get_total_norm([p.grad for p in params]))
            bad, loss_total, norm = nonfinite_step(loss, grad_norm, device)
            if bad:
                where = f"epoch {epoch + 1} step {step + 1}/{steps} (global step {global_step})"
                if not cfg.train.skip_nonfinite:
                    stopped = (f"non-finite loss or gradients at {where} (loss summed over ranks {loss_total}, "
                               f"gradient norm {norm}); stopped with nothing saved from this step, the last good "
                               f"checkpoint ({last_saved}) is kept: rerun with a lower optim.lr (now "
                               f"{cfg.peak_lr():g} peak) or --set train.skip_nonfinite=true to skip such steps")
                    break
                skipped += 1
                log(f"[trainer] skipped {where}: non-finite loss or gradients (train.skip_nonfinite)")
                optimizer.zero_grad(set_to_none=True)
                if scheduler.per_step:
                    scheduler.step()
                continue
            optimizer.step()
            if scheduler.per_step:
                scheduler.step()
            loss_sum += loss.detach().double() * labels.shape[0]
            seen += labels.shape[0]
            window_images += labels.shape[0] * world
            every = cfg.train.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < steps:
                mine = {"loss_sum": float(loss_sum), "seen": seen, "skipped": skipped,
                        "loader": train_loader.state_dict(), "rng": ckpt.rng_state()}
                ranks = gather(mine)
                rng_states = [r.pop("rng") for r in ranks]
                report_checkpoint(rank, {"epoch": epoch, "step": step + 1, "val_top1": -1.0, "mid_epoch": 1},
                                  training_state(epoch - 1, step + 1, ranks) if rank == 0 else None)
                last_saved = f"epoch {epoch} + {step + 1} steps"
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps:
                current = float(loss.detach())
                now = time.perf_counter()
                log(f"[trainer] epoch {epoch + 1}/{cfg.train.epochs} step {step + 1}/{steps} loss {current:.4f} "
                    f"lr {optimizer.param_groups[0]['lr']:.4g} {window_images / (now - t_window):.1f} images/s")
                t_window, window_images = now, 0
        if stopped:
            break
        train_time = time.perf_counter() - t0
        train_loss_sum, train_seen = all_reduce_sum([float(loss_sum), seen], device)

        counts = evaluate_counts(net, val_loader, device, cfg)
        v = dict(zip(("loss_sum", "top1", "top5", "n"),
                     all_reduce_sum([counts["loss_sum"], counts["top1"], counts["top5"], counts["n"]], device)))
        val_top1, val_top5 = v["top1"] / v["n"], v["top5"] / v["n"]
        lr_used = optimizer.param_groups[0]["lr"]
        if not scheduler.per_step:
            scheduler.step(val_top1)
        is_best = val_top1 > best_top1
        best_top1 = max(best_top1, val_top1)
        record = {"epoch": epoch, "train_loss": train_loss_sum / train_seen, "val_loss": v["loss_sum"] / v["n"],
                  "val_top1": val_top1, "val_top5": val_top5, "val_n": int(v["n"]), "lr": lr_used,
                  "images_per_s": train_seen / train_time, "epoch_time_s": time.perf_counter() - t0,
                  "workers": world, "global_batch": per_rank_batch * world,
                  "skipped_steps": int(all_reduce_sum([skipped], device)[0]) // world}
        rng_states = gather_rng_states()
        if cfg.run.save_rank_states:
            ckpt.atomic_save(ckpt.plain_state_dict(net), run_dir / "rank_states" / f"rank{rank}.pt")

        if rank == 0:
            log(f"[trainer] epoch {epoch + 1}/{cfg.train.epochs} train_loss {record['train_loss']:.4f} "
                f"val top-1 {100 * val_top1:.2f} % top-5 {100 * val_top5:.2f} % (n={int(v['n'])}) "
                f"{record['images_per_s']:.1f} images/s")
            metrics.log(record)
            files = model_file(net, cfg, classes, record)
            ckpt.atomic_save(files, run_dir / "last.pt")
            if is_best:
                ckpt.atomic_save(files, run_dir / "best.pt")
        report_checkpoint(rank, {k: record[k] for k in ("epoch", "train_loss", "val_top1", "val_top5", "lr",
                                                        "images_per_s")},
                          training_state(epoch, 0, None) if rank == 0 else None)
        last_saved = f"epoch {epoch + 1}"
    if stopped:  # every rank got here together; return instead of raising, so Ray Train does not retry
        log(f"[trainer] {stopped}")
        if rank == 0:
            (run_dir / STOPPED).write_text(stopped + "\n")
    if metrics is not None:
        metrics.close()


# ---------------------------------------------------------------------------------------- driver

def init_ray(num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Join RAY_ADDRESS if set (or an already initialised Ray), else start a local cluster.

    Ray's CPU counts are logical, so the local cluster advertises at least one CPU per worker plus one
    for the driver: two CPU workers fit on a 2-core machine (they then share the cores)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    need = math.ceil(num_workers * cpus_per_worker)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_per_worker and gpus < num_workers * gpus_per_worker:
        raise ValueError(f"--workers {num_workers} x --gpus-per-worker {gpus_per_worker} needs "
                         f"{num_workers * gpus_per_worker:g} GPUs; this machine has {gpus}. Use --gpus-per-worker 0 "
                         f"for CPU workers or set RAY_ADDRESS to a cluster with GPUs")
    ray.init(num_cpus=max(os.cpu_count() or 1, need + 1), num_gpus=gpus, include_dashboard=False,
             log_to_driver=True)


def wait_for_placement(num_workers: int, per_worker: dict[str, float], timeout_s: float) -> None:
    """Return once the cluster's live nodes can hold every worker (each on one node), or fail after
    ``timeout_s`` (an autoscaling cluster may add nodes meanwhile) instead of waiting forever."""
    import ray

    deadline, fits, nodes = time.monotonic() + timeout_s, 0, []
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = sum(min(int(node.get(k, 0) // v) for k, v in per_worker.items() if v > 0) for node in nodes)
        if fits >= num_workers:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    have = ", ".join("{" + ", ".join(f"{k}: {n.get(k, 0):g}" for k in per_worker) + "}" for n in nodes) or "none"
    want = ", ".join(f"{k}: {v:g}" for k, v in per_worker.items())
    raise ValueError(f"the Ray cluster can place {fits} of {num_workers} workers needing {{{want}}} each "
                     f"(live nodes: {have}) after waiting {timeout_s:g} s (run.placement_timeout_s); lower --workers "
                     f"or run.cpus_per_worker / --gpus-per-worker, or add nodes")


def worker_error(error: BaseException) -> BaseException:
    """A bad-input error raised in a worker (e.g. a ShardError), as the one-line ValueError it was."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        base = getattr(failure, "_base_exc", failure)   # Ray Train wraps it with its traceback text
        if isinstance(base, ValueError):
            return ValueError(str(base).strip().splitlines()[-1])
    return error


def check_run_dir(cfg: Config, classes: list[str]) -> None:
    """A rerun with the same RUN_DIR resumes; refuse one whose model would not load the saved weights."""
    saved = Path(cfg.run.out) / "config.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        mismatched = [f"{s}.{k}" for s, k in (("model", "width"), ("data", "image_size"))
                      if old["config"][s][k] != getattr(getattr(cfg, s), k)]
        if old["classes"] != classes:
            mismatched.append("classes")
        if mismatched:
            raise ValueError(f"{saved}: this RUN_DIR holds a run with different {', '.join(mismatched)}; "
                             f"resume with the same settings or pass a new --out")


def _absolute(path_or_url: str) -> str:
    return path_or_url if "://" in path_or_url else str(Path(path_or_url).resolve())


def fit(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says; return the last reported metrics (empty when there was nothing left to do)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg.run.out = str(Path(cfg.run.out).resolve())
    cfg.data.train, cfg.data.val = _absolute(cfg.data.train), _absolute(cfg.data.val)
    if cfg.data.stage_to:  # sources may be URLs: read only their classes.json here; workers stage them
        from shards.stage import source_classes
        cfg.data.stage_to = str(Path(cfg.data.stage_to).resolve())
        classes, val_classes = source_classes(cfg.data.train), source_classes(cfg.data.val)
    else:  # a missing, empty, truncated or label-less split fails here in one line, not in every worker
        from pipeline.shardset import ShardSet
        classes, val_classes = list(ShardSet.open(cfg.data.train).classes), list(ShardSet.open(cfg.data.val).classes)
    if val_classes != classes:
        raise ValueError(f"{cfg.data.val}/classes.json differs from {cfg.data.train}/classes.json; rebuild val with "
                         f"`python -m shards build ... --classes {cfg.data.train}/classes.json`")
    check_run_dir(cfg, classes)
    run_dir = Path(cfg.run.out)

    init_ray(cfg.run.workers, cfg.run.cpus_per_worker, cfg.run.gpus_per_worker)
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.on_gpu():
        resources["GPU"] = cfg.run.gpus_per_worker
    wait_for_placement(cfg.run.workers, resources, cfg.run.placement_timeout_s)
    run_dir.mkdir(parents=True, exist_ok=True)   # only now: a refused run leaves no RUN_DIR behind
    tmp = run_dir / ".config.json.tmp"
    tmp.write_text(json.dumps({"config": cfg.to_dict(), "classes": classes}, indent=1))
    os.replace(tmp, run_dir / "config.json")
    (run_dir / STOPPED).unlink(missing_ok=True)   # left by a run that stopped on a NaN; this one starts over
    print(f"[trainer] fit: {cfg.run.workers} worker(s) x {resources}, global batch {cfg.train.batch_size}, "
          f"preset {cfg.preset}, width {cfg.model.width}, peak lr {cfg.peak_lr():g}, {len(classes)} classes, "
          f"run dir {run_dir}")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "classes": classes},
        torch_config=TorchConfig(backend="nccl" if cfg.on_gpu() else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.workers, use_gpu=cfg.on_gpu(),
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RAY_SUBDIR, storage_path=str(run_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_top1",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train raises the group's error; a worker's bad-input error becomes one line
        one_line = worker_error(e)
        if one_line is e:
            raise
        raise one_line from None
    if result.error is not None:
        raise worker_error(result.error)
    if (run_dir / STOPPED).is_file():
        raise faults.TrainingStopped((run_dir / STOPPED).read_text().strip())
    return dict(result.metrics or {})
