"""`python -m trainer fit`: the driver, and the thin adapter that runs a :class:`~trainer.train.Trainer` in Ray Train.

The driver (:func:`fit`) checks the data and RUN_DIR, then runs a ``TorchTrainer`` whose workers each run
:func:`train_worker`: Ray's context becomes a :class:`~trainer.train.Placement` (rank, world size, devices) and
checkpoints go to ``ray.train.report``. Everything else is plain torch in trainer/train.py and trainer/loop.py.

``run.workers`` 0 is Ray Train's local mode: the training function runs in this process, with no Ray cluster
and no actors; under ``torchrun`` each of its processes is one rank (docs/training.md, "Local mode").
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from shards import fileio
from trainer import checkpoint as ckpt
from trainer.config import Config, config_from_dict
from trainer.console import Follow, RunLog
from trainer.faults import TrainingStopped
from trainer.train import STOPPED, Placement, Trainer

RAY_SUBDIR = "ray"


# ---------------------------------------------------------------------------------------- worker

def worker_devices(cfg: Config, local_rank: int, local_mode: bool) -> tuple[torch.device, ...]:
    """The devices this worker trains on (two for ``run.parallel=model``: two CPU 'devices' on the CPU)."""
    columns = 2 if cfg.run.parallel == "model" else 1
    if not cfg.on_gpu():
        return (torch.device("cpu"),) * columns
    if local_mode:   # no Ray GPU assignment: torchrun's local rank picks this process's GPUs
        per = int(cfg.run.gpus_per_worker)
        devices = tuple(torch.device(f"cuda:{local_rank * per + i}") for i in range(per))
    else:
        import ray.train.torch
        devices = tuple(ray.train.torch.get_devices())
    torch.cuda.set_device(devices[0])
    return devices


def ray_publish(metrics: dict, directory: Path | None) -> None:
    """Every rank reports; the one with a written training state attaches it as a Ray Train checkpoint."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)) if directory else None)


def local_publish(storage: Path):
    """Local mode persists no checkpoint: keep them on the storage path as Ray Train would, report metrics."""
    keep = ckpt.save_to_storage(storage)

    def publish(metrics: dict, directory: Path | None) -> None:
        keep(metrics, directory)
        ray_publish(metrics, None)
    return publish


def train_worker(loop_config: dict) -> None:
    """Runs in every Ray Train worker (or, in local mode, in this process)."""
    import ray.train

    cfg: Config = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    local_mode = cfg.run.workers == 0
    if not local_mode and not loop_config.get("verbose"):
        # Ray Train gives a worker's root logger a console handler at INFO; some of its own INFO lines (e.g.
        # "Reporting training result", logged under a file path, not "ray.train") reach the driver that way
        logging.getLogger().setLevel(logging.WARNING)
    place = Placement(rank=ctx.get_world_rank(), world=ctx.get_world_size(), local_rank=ctx.get_local_rank(),
                      devices=worker_devices(cfg, ctx.get_local_rank(), local_mode))
    publish = local_publish(Path(cfg.run.out) / RAY_SUBDIR) if local_mode else ray_publish
    trainer = Trainer(cfg, loop_config["classes"], place, publish, ray.train.get_checkpoint(),
                      log=RunLog(cfg.run.out))
    if cfg.fault.record_keys:
        from trainer.faults import KeyRecorder

        recorder = KeyRecorder(cfg.run.out, place.rank, place.world)
        trainer.train_loader = recorder.wrap(trainer.train_loader)
        trainer.hooks.append(recorder)
    if local_mode or not cfg.run.preemption_check_every:
        trainer.run()
        return
    from trainer.preemption import deferring_sigterm

    trainer.hooks.append(preemption_check(trainer, cfg.run.preemption_check_every))
    with deferring_sigterm():
        trainer.run()


def preemption_check(trainer: Trainer, every: int):
    """The preemption hook (trainer/preemption.py) for this rank: Ray's notice, checkpoints through ``trainer``."""
    import ray.train

    from trainer.hooks import NonFinitePolicy
    from trainer.preemption import PreemptionCheck

    nonfinite = [h for h in trainer.hooks if isinstance(h, NonFinitePolicy)]
    periodic = trainer.cfg.train.checkpoint_every

    def save(at) -> None:
        for policy in nonfinite:   # a NaN step found now stops the run before it reaches a checkpoint
            policy.read(at.steps)
        if not (periodic and (at.step + 1) % periodic == 0):   # else MidEpochCheckpoint just saved this step
            trainer.save_mid_epoch(at)

    return PreemptionCheck(every, save, ray.train.get_preemption_info, trainer.device, trainer.log)


# ---------------------------------------------------------------------------------------- driver

def worker_error(error: BaseException) -> BaseException:
    """A bad-input error raised in a worker (e.g. a ShardError), as the one-line ValueError it was."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        base = getattr(failure, "_base_exc", failure)   # Ray Train wraps it with its traceback text
        if isinstance(base, ValueError):
            return ValueError(str(base).strip().splitlines()[-1])
    return error


def check_run_dir(cfg: Config, classes: list[str]) -> None:
    """A rerun with the same RUN_DIR resumes; refuse one whose model would not load the saved weights, whose
    inputs differ (data.normalize) or whose training state has another shape (run.parallel: the split model's
    optimizer state and per-device RNG states load only into the same mode)."""
    saved = Path(cfg.run.out) / "config.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        # keys absent from an older config.json had these values then: the paper's net, (x - mean) / std inputs
        legacy = {("model", ckpt.CONFIG_NAMES[k]): v for k, v in ckpt.VARIANT_DEFAULTS.items()}
        legacy[("data", "normalize")] = ckpt.LEGACY_NORMALIZE
        keys = [("model", "width"), ("data", "image_size"), ("run", "parallel"), *legacy]
        mismatched = [f"{s}.{k}" for s, k in keys
                      if old["config"][s].get(k, legacy.get((s, k))) != getattr(getattr(cfg, s), k)]
        if old["classes"] != classes:
            mismatched.append("classes")
        if mismatched:
            raise ValueError(f"{saved}: this RUN_DIR holds a run with different {', '.join(mismatched)}; "
                             f"resume with the same settings or pass a new --out")


def _absolute(path_or_url: str) -> str:
    return path_or_url if "://" in path_or_url else str(Path(path_or_url).resolve())


def data_classes(cfg: Config) -> list[str]:
    """The class names of train and val, which must agree; a bad split fails here in one line, not in workers."""
    if cfg.data.stage_to:  # sources may be URLs: read only their classes.json here; workers stage them
        from shards.stage import source_classes
        classes, val_classes = source_classes(cfg.data.train), source_classes(cfg.data.val)
    else:
        from pipeline.shardset import ShardSet
        classes, val_classes = list(ShardSet.open(cfg.data.train).classes), list(ShardSet.open(cfg.data.val).classes)
    if val_classes != classes:
        raise ValueError(f"{cfg.data.val}/classes.json differs from {cfg.data.train}/classes.json; rebuild val with "
                         f"`python -m shards build ... --classes {cfg.data.train}/classes.json`")
    return classes


def choose_workers(cfg: Config, verbose: bool = False) -> str:
    """Resolve ``"auto"`` workers / GPUs per worker (trainer/ray_cluster.py ``decide_workers``) in ``cfg``;
    join or start the Ray cluster they run on. Returns the reason for the start line."""
    from trainer.ray_cluster import (batch_split_error, decide_cpus, decide_workers, init_ray,
                                     joins_existing_cluster, local_resources)

    r = cfg.run
    if r.max_workers:   # elastic: the group is sized by Ray Train as nodes come and go, never "auto"
        r.workers = r.max_workers
    auto = "auto" in (r.workers, r.gpus_per_worker)
    if not auto and (r.cpus_per_worker != "auto" or not r.gpus_per_worker):   # auto CPUs: GPU workers' share
        resources = {}
    elif r.workers == 0 or not joins_existing_cluster():
        resources = local_resources()   # local mode, or the local cluster init_ray starts below
    else:
        import ray

        init_ray(1, 1, 0, verbose=verbose)   # joins RAY_ADDRESS: count *its* GPUs and CPUs
        resources = ray.cluster_resources()
    if r.max_workers:   # GPUs per worker "auto": what the smallest group would find
        _, r.gpus_per_worker, reason = decide_workers(r.min_workers, r.gpus_per_worker, resources,
                                                      parallel=r.parallel)
        reason = elastic_reason(reason, r.min_workers, r.max_workers, r.gpus_per_worker)
    else:
        r.workers, r.gpus_per_worker, reason = decide_workers(r.workers, r.gpus_per_worker, resources,
                                                              parallel=r.parallel)
    r.cpus_per_worker = decide_cpus(r.cpus_per_worker, r.gpus_per_worker, r.workers, resources.get("CPU", 0))
    if auto and r.workers and cfg.train.batch_size % r.workers:
        raise ValueError(batch_split_error(cfg.train.batch_size, r.workers, reason))
    cfg.validate(need_data=False)   # what "auto" became, checked like explicit values
    if r.workers:
        init_ray(r.workers, r.cpus_per_worker, r.gpus_per_worker, verbose=verbose)
    return reason


def elastic_reason(reason: str, low: int, high: int, gpus: float) -> str:
    """The start line's reason for an elastic group, e.g. ``as set: elastic 1-4 workers x 1 GPU``."""
    found = reason.split(": ", 1)[0]
    return f"{found}: elastic {low}-{high} " + (f"workers x {gpus:g} GPU{'' if gpus == 1 else 's'}" if gpus
                                                else "CPU workers")


def num_workers(cfg: Config) -> int | tuple[int, int]:
    """Ray Train's ``num_workers``: a fixed size, or ``(min, max)`` for an elastic group."""
    r = cfg.run
    return (r.min_workers, r.max_workers) if r.max_workers else r.workers


def fit(cfg: Config, verbose: bool = False) -> dict[str, Any]:
    """Train as ``cfg`` says; return the last reported metrics (empty when there was nothing left to do).

    Rank 0's lines reach this process through RUN_DIR/train.log (trainer/console.py); Ray's own log lines
    stay in Ray's log folder unless ``verbose``."""
    import ray.train
    from ray.train.torch import TorchConfig

    from trainer.preemption import preemptible_torch_config
    from trainer.ray_cluster import FailureNotice, lean_torch_trainer, watch_preemption

    cfg.run.out = str(Path(cfg.run.out).resolve())
    cfg.data.train, cfg.data.val = _absolute(cfg.data.train), _absolute(cfg.data.val)
    if cfg.data.stage_to:
        cfg.data.stage_to = str(Path(cfg.data.stage_to).resolve())
    classes = data_classes(cfg)
    check_run_dir(cfg, classes)
    run_dir = Path(cfg.run.out)

    reason = choose_workers(cfg, verbose)
    local_mode = cfg.run.workers == 0
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": cfg.run.gpus_per_worker} if cfg.on_gpu() else {})}
    if local_mode:
        # Ray Train's local mode logs its mode and every report at INFO
        logging.getLogger("ray.train").setLevel(logging.INFO if verbose else logging.WARNING)
        if cfg.on_gpu() and not torch.cuda.is_available():
            raise ValueError(f"--workers 0 --gpus-per-worker {cfg.run.gpus_per_worker:g}: this machine has no "
                             f"CUDA GPU; use --gpus-per-worker 0")
    else:
        from trainer.ray_cluster import dashboard_notice, wait_for_placement
        if notice := dashboard_notice():
            print(notice, flush=True)
        wait_for_placement(cfg.run.min_workers or cfg.run.workers, resources, cfg.run.placement_timeout_s)
        watch_preemption(bool(cfg.run.preemption_check_every))
    rank0 = int(os.environ.get("RANK", 0)) == 0   # under torchrun, one process writes the run's files
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)   # only now: a refused run leaves no RUN_DIR behind
        fileio.write_text(run_dir / "config.json", json.dumps({"config": cfg.to_dict(), "classes": classes}, indent=1))
        (run_dir / STOPPED).unlink(missing_ok=True)   # left by a run that stopped on a NaN; this one starts over
        where = ("local mode (this process" + (", one rank per torchrun process)" if "RANK" in os.environ else ")")
                 if local_mode else f"elastic {cfg.run.min_workers}-{cfg.run.max_workers} worker(s)"
                 if cfg.run.max_workers else f"{cfg.run.workers} worker(s)")
        each = " + ".join(f"{v:g} {k}" for k, v in resources.items())
        print(f"[trainer] fit: {reason}; {where} x {each}, global batch {cfg.train.batch_size}, "
              f"preset {cfg.preset}, {cfg.precision_note()}, width {cfg.model.width}, peak lr {cfg.peak_lr():g}, "
              f"{len(classes)} classes, run dir {run_dir}", flush=True)
    trainer = lean_torch_trainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "classes": classes, "verbose": verbose},
        torch_config=(preemptible_torch_config if cfg.run.preemption_check_every else TorchConfig)(
            backend="nccl" if cfg.on_gpu() else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers(cfg), use_gpu=cfg.on_gpu(),
                                               resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=cfg.run.resize_check_s),
        run_config=ray.train.RunConfig(
            name=RAY_SUBDIR, storage_path=str(run_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_top1",
                                                         checkpoint_score_order="max"),
            # a reclaimed spot node counts against max_preemption_failures, not max_failures; the notice's
            # checkpoint needs every rank (DDP), so Ray's collectives are not relaxed (docs/reliability.md)
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                                   max_preemption_failures=cfg.run.max_preemption_failures,
                                                   preemption_grace_s=cfg.run.preemption_grace_s,
                                                   relax_collectives_on_preemption=False),
            # Ray Train's INFO lines (resources, worker group, every report) go to Ray's log folder only
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            callbacks=[FailureNotice(str(run_dir), cfg.run.max_failures,   # one line per failed worker
                                     cfg.run.max_preemption_failures)]),
    )
    try:
        with Follow(run_dir) if rank0 else contextlib.nullcontext():
            result = trainer.fit()
    except Exception as e:  # Ray Train raises the group's error; a worker's bad-input error becomes one line
        one_line = worker_error(e)
        if one_line is e:
            raise
        raise one_line from None
    if result.error is not None:
        raise worker_error(result.error)
    if (run_dir / STOPPED).is_file():
        raise TrainingStopped((run_dir / STOPPED).read_text().strip())
    return dict(result.metrics or {})
