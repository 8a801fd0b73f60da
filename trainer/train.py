"""One rank of a training run, in plain torch: model, loaders, optimizer, schedule, checkpoints and metrics.

:class:`Trainer` is what a Ray Train worker runs (trainer/fit.py is only the adapter from Ray's context to a
:class:`Placement` and from checkpoints to ``ray.train.report``), and it runs as well under ``torchrun`` or
in a single process. Per epoch: train (trainer/loop.py), validate over exactly the val set (masked counts,
summed over ranks), then rank 0 writes RUN_DIR/metrics.jsonl, TensorBoard, curves.png, last.pt and best.pt,
and every rank saves the training state through the :class:`~trainer.checkpoint.Checkpointer`.

With ``train.checkpoint_every N`` the training state is also saved every N steps inside an epoch, holding
every rank's loader position, RNG state and running totals, so a restarted group continues exactly there,
and the epoch's data position as the whole group's (pipeline/loader.py ``merge_positions``), so a group of
another size continues the epoch from it (docs/training.md, "Elastic groups").

A step is always ``train.batch_size`` images: a fixed group splits it evenly, one batch per rank; an elastic one
(``run.max_workers``) into ``max_workers`` micro-batches, which its ranks share and add up (trainer/loop.py).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.config import derive_seed
from pipeline.loader import merge_positions
from shards import fileio
from trainer import checkpoint as ckpt
from trainer.config import Config
from trainer.distributed import all_reduce_sum, gather
from trainer.faults import FaultInjector
from trainer.hooks import NonFinitePolicy, NonFiniteStep, ProgressLog
from trainer.loop import EpochProgress, Hook, Step, evaluate, train_epoch
from trainer.metrics import MetricsLog
from trainer.model import AlexNet
from trainer.parallelize import parallelize, training_stream
from trainer.schedule import make_optimizer, make_scheduler

STOPPED = "stopped.txt"   # why a run stopped on purpose (written by rank 0, read by the driver)


def say(message: str) -> None:
    """One progress line. Written to stdout directly: Ray Train's patched print() would log it twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Placement:
    """This rank's place in the group and the devices it trains on (two for ``run.parallel=model``)."""
    rank: int
    world: int
    local_rank: int
    devices: tuple[torch.device, ...]


def build_model(cfg: Config, num_classes: int) -> AlexNet:
    return AlexNet(num_classes, width=cfg.model.width, dropout=cfg.model.dropout, init=cfg.model.init,
                   image_size=cfg.data.image_size, **cfg.model.build_args())


def model_file(net: torch.nn.Module, cfg: Config, classes: list[str], record: dict[str, Any]) -> dict:
    """The plain model file (last.pt / best.pt): state dict + what eval/predict need to rebuild it."""
    return {"model": ckpt.plain_state_dict(net),
            "meta": {"classes": list(classes), "width": cfg.model.width, "dropout": cfg.model.dropout,
                     **cfg.model.build_args(),
                     "image_size": cfg.data.image_size, "resize_shorter": cfg.data.shorter_side(),
                     "normalize": cfg.data.normalize, "preset": cfg.preset, "epoch": record["epoch"],
                     "val_top1": record["val_top1"], "val_top5": record["val_top5"]}}


class Trainer:
    def __init__(self, cfg: Config, classes: list[str], place: Placement,
                 publish: Callable[[dict, Path | None], None], registered_checkpoint: Any = None,
                 log: Callable[[str], None] = say):
        """``log`` takes rank 0's lines (stdout by default; fit gives a trainer.console.RunLog, whose ``tick``
        also feeds the driver's progress bar)."""
        from pipeline import make_eval_loader, make_train_loader

        self.cfg, self.classes, self.place = cfg, list(classes), place
        self.rank, self.world, self.device = place.rank, place.world, place.devices[0]
        self.run_dir = Path(cfg.run.out)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)

        torch.manual_seed(cfg.train.seed)          # same initial weights on every rank (DDP also broadcasts)
        self.net, self.model = parallelize(build_model(cfg, len(classes)), cfg, place.devices, place.world)

        train_dir, val_dir = cfg.data.train, cfg.data.val
        if cfg.data.stage_to:  # one copy per node (local rank 0), the other ranks wait at a barrier
            from shards.stage import stage_once_per_node
            local = stage_once_per_node(cfg.data.stage_to, {"train": train_dir, "val": val_dir}, place.local_rank)
            train_dir, val_dir = local["train"], local["val"]
        # micro-batches in a step: one per rank in a fixed group; max_workers in an elastic one, whatever its size
        units = cfg.run.max_workers or place.world
        if cfg.train.batch_size % units or place.world > units:
            raise ValueError(f"train.batch_size ({cfg.train.batch_size}) is the global batch and must divide evenly "
                             f"by the {units} " + ("ranks" if units == place.world else
                                                    f"micro-batches of run.max_workers, for {place.world} ranks"))
        self.micro = cfg.train.batch_size // units
        loader_args = dict(rank=self.rank, world_size=self.world, device=self.device, batch_size=self.micro)
        self.train_loader = make_train_loader(cfg.loader_config(train_dir, **loader_args).replace(
            global_batch=cfg.train.batch_size), kind=cfg.data.loader)
        loader_args["batch_size"] = self.micro * (units // self.world)
        self.val_loader = make_eval_loader(cfg.loader_config(val_dir, **loader_args), kind=cfg.data.loader)
        self.accumulate = self.train_loader.micro           # this rank's micro-batches per step
        self.loss_scale = self.world / units                # DDP's mean over ranks -> the global batch's mean
        self.steps = len(self.train_loader) // self.accumulate
        if cfg.train.max_steps_per_epoch:
            self.steps = min(self.steps, cfg.train.max_steps_per_epoch)

        self.optimizer = make_optimizer(self.net, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.steps)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.checkpointer = ckpt.Checkpointer(
            self.run_dir / "ray", {"model": ckpt.ModelState(self.net), "optimizer": self.optimizer,
                                   "scheduler": self.scheduler},
            publish, registered=registered_checkpoint, log=self.log)
        self.progress_log = ProgressLog(cfg.train.log_every, cfg.train.epochs, self.world, self.optimizer, self.log,
                                        tick=getattr(self.log, "tick", None), global_batch=cfg.train.batch_size)
        self.hooks: list[Hook] = [FaultInjector(cfg.fault, self.run_dir, self.rank),
                                  NonFinitePolicy(cfg.train.skip_nonfinite, cfg.train.log_every,
                                                  cfg.train.checkpoint_every, self.log),
                                  MidEpochCheckpoint(self, cfg.train.checkpoint_every), self.progress_log]
        # where training resumes: epoch, step within it, this rank's running totals, the best val top-1
        self.epoch, self.step, self.best_top1 = 0, 0, -1.0
        self.progress = EpochProgress.from_state(None, self.device)
        self.last_saved = "none"
        self.resizes: list[dict] = []   # this epoch's group size changes, for its metrics.jsonl line
        self.resize_unsaved = False     # a resized group saves after its first step (MidEpochCheckpoint)

    # ---- checkpoints ---------------------------------------------------------------------------
    def position(self, last_epoch: int, step: int, rng: list, ranks: list | None) -> dict[str, Any]:
        """What a checkpoint holds besides model, optimizer and schedule (Checkpointer.save): the last finished
        epoch, then for a mid-epoch checkpoint the steps done in the next one and every rank's data position."""
        return {"epoch": last_epoch, "best_top1": self.best_top1, "rng": rng, "config": self.cfg.to_dict(),
                "classes": self.classes, "resize_shorter": self.cfg.data.shorter_side(), "step": step,
                "ranks": ranks, "workers": self.world, "micro_batch": self.micro,
                "resizes": self.resizes if ranks else []}

    def save_mid_epoch(self, at: Step) -> None:
        """Every rank's loader position, running totals and RNG state, then the checkpoint (all ranks call).
        The consumed samples are merged into one bitmap (``data``), the same whatever the group's size."""
        mine = {**self.progress.state_dict(), "loader": self.train_loader.state_dict(),
                "rng": ckpt.rng_state(self.place.devices)}
        ranks = gather(mine)
        position = None
        if self.rank == 0:
            rng = [r.pop("rng") for r in ranks]
            data = {**merge_positions([r["loader"] for r in ranks], self.train_loader.shardset.num_samples),
                    "base": ranks[0]["loader"].get("base")}   # what this epoch's readers left out: the same on every rank
            for r in ranks:   # kept once, in data
                r["loader"].pop("consumed", None), r["loader"].pop("base", None)
            position = {**self.position(at.epoch - 1, at.step + 1, rng, ranks), "data": data}
        self.checkpointer.save({"epoch": at.epoch, "step": at.step + 1, "val_top1": -1.0, "mid_epoch": 1}, position)
        self.last_saved = f"epoch {at.epoch} + {at.step + 1} steps"
        self.resize_unsaved = False

    def restore(self) -> None:
        where, state = self.checkpointer.restore()
        if state is None:
            torch.manual_seed(self.cfg.train.seed * 1000 + self.rank + 1)   # per-rank dropout masks
            return
        self.epoch, self.best_top1 = state["epoch"] + 1, state["best_top1"]
        was = int(state.get("workers", len(state["rng"])))
        same = was == self.world and state.get("micro_batch", self.micro) == self.micro
        if same:
            ckpt.set_rng_state(state["rng"][self.rank], self.place.devices)
        ranks = state.get("ranks")   # set by a mid-epoch checkpoint: every rank's position in the epoch
        data = state.get("data")     # and the whole group's, as one bitmap of consumed samples
        if ranks and same:           # exactly where each rank stood: the uninterrupted run's batches
            self.step = state["step"]
            self.progress = EpochProgress.from_state(ranks[self.rank], self.device)
            self.train_loader.load_state_dict({**ranks[self.rank]["loader"], **(data or {})})
        elif ranks and data:         # another size: the epoch's remaining samples, split among this group
            self.step = state["step"]
            totals = {k: sum(r[k] for r in ranks) for k in ("loss_sum", "seen", "skipped")}
            self.progress = EpochProgress.from_state(totals if self.rank == 0 else None, self.device)
            self.train_loader.load_position(data)
        elif ranks:
            self.log(f"[trainer] the checkpoint was taken mid-epoch by {len(ranks)} workers, not {self.world}: "
                     f"epoch {self.epoch + 1} restarts from its first batch")
        if not same:   # per-rank dropout streams for the new group
            torch.manual_seed(derive_seed(self.cfg.train.seed, self.rank, self.world, self.epoch, self.step))
        self.resizes = list(state.get("resizes") or []) if ranks else []
        if was != self.world:
            self.resize_unsaved = True
            self.resizes.append({"from": was, "to": self.world, "epoch": self.epoch, "step": self.step})
            self.log(f"[trainer] the group changed from {was} to {self.world} workers at epoch {self.epoch + 1} step "
                     f"{self.step}; global batch {self.cfg.train.batch_size} kept ({self.accumulate} x {self.micro} "
                     f"per worker and step)")
        self.last_saved = f"epoch {self.epoch}" + (f" + {self.step} steps" if self.step else "")
        if self.epoch < self.cfg.train.epochs:
            self.log(f"[trainer] resumed from {where} at epoch {self.epoch + 1}/{self.cfg.train.epochs}"
                     + (f" step {self.step + 1}/{self.steps}" if self.step else ""))

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> str:
        """Train the remaining epochs; return why the run stopped early ("" when it did not)."""
        with training_stream(self.cfg.train.cuda_stream, self.device):
            return self._run()

    def _run(self) -> str:
        cfg = self.cfg
        self.restore()
        metrics = MetricsLog(self.run_dir, self.epoch) if self.rank == 0 else None
        if self.epoch >= cfg.train.epochs:
            self.log(f"[trainer] {self.run_dir} is already trained for {cfg.train.epochs} epochs; nothing to do")
        stopped = ""
        try:
            for epoch in range(self.epoch, cfg.train.epochs):
                self.train_loader.set_epoch(epoch)
                first_step = self.step if epoch == self.epoch else 0
                if not first_step:
                    self.progress = EpochProgress.from_state(None, self.device)
                self.progress_log.start_epoch()
                t0 = time.perf_counter()
                train_epoch(self.model, self.train_loader, self.optimizer, self.scheduler, self.hooks,
                            epoch=epoch, steps=self.steps, first_step=first_step, progress=self.progress,
                            criterion=self.criterion, grad_clip=cfg.optim.grad_clip, bf16=cfg.use_bf16(),
                            accumulate=self.accumulate, loss_scale=self.loss_scale)
                self.end_epoch(epoch, t0, metrics)
        except NonFiniteStep as bad:   # every rank got here together; return, so Ray Train does not retry
            stopped = (f"non-finite loss or gradients at {bad.at} (loss summed over ranks {bad.loss_total}, "
                       f"gradient norm {bad.grad_norm}); stopped with nothing saved from this step, the last good "
                       f"checkpoint ({self.last_saved}) is kept: rerun with a lower optim.lr (now "
                       f"{cfg.peak_lr():g} peak) or --set train.skip_nonfinite=true to skip such steps")
            self.log(f"[trainer] {stopped}")
            if self.rank == 0:
                fileio.write_text(self.run_dir / STOPPED, stopped + "\n")
        finally:
            if metrics is not None:
                metrics.close()
        return stopped

    def end_epoch(self, epoch: int, t0: float, metrics: MetricsLog | None) -> None:
        """Validate, log, write the model files and save the training state."""
        cfg, device = self.cfg, self.device
        train_time = time.perf_counter() - t0
        train_loss_sum, train_seen, train_correct = all_reduce_sum(
            [float(self.progress.loss_sum), int(self.progress.seen), int(self.progress.correct)], device)
        counts = evaluate(self.net, self.val_loader, device, bf16=cfg.use_bf16())
        v = dict(zip(("loss_sum", "top1", "top5", "n"),
                     all_reduce_sum([counts["loss_sum"], counts["top1"], counts["top5"], counts["n"]], device)))
        val_top1, val_top5 = v["top1"] / v["n"], v["top5"] / v["n"]
        lr_used = self.optimizer.param_groups[0]["lr"]
        if not self.scheduler.per_step:
            self.scheduler.step(val_top1)
        is_best = val_top1 > self.best_top1
        self.best_top1 = max(self.best_top1, val_top1)
        record = {"epoch": epoch, "train_loss": train_loss_sum / train_seen, "train_top1": train_correct / train_seen,
                  "val_loss": v["loss_sum"] / v["n"],
                  "val_top1": val_top1, "val_top5": val_top5, "val_n": int(v["n"]), "lr": lr_used,
                  "images_per_s": train_seen / train_time, "epoch_time_s": time.perf_counter() - t0,
                  "workers": self.world, "global_batch": cfg.train.batch_size, "resizes": self.resizes,
                  "skipped_steps": int(all_reduce_sum([int(self.progress.skipped)], device)[0]) // self.world}
        rng = gather(ckpt.rng_state(self.place.devices))
        if cfg.run.save_rank_states:
            ckpt.atomic_save(ckpt.plain_state_dict(self.net), self.run_dir / "rank_states" / f"rank{self.rank}.pt")
        if self.rank == 0:
            self.log(f"[trainer] epoch {epoch + 1}/{cfg.train.epochs} train_loss {record['train_loss']:.4f} "
                     f"val top-1 {100 * val_top1:.2f} % top-5 {100 * val_top5:.2f} % (n={int(v['n'])}) "
                     f"{record['images_per_s']:.1f} images/s")
            metrics.log(record)
            files = model_file(self.net, cfg, self.classes, record)
            ckpt.assert_finite(files["model"], f"{self.run_dir}/last.pt")
            ckpt.atomic_save(files, self.run_dir / "last.pt")
            if is_best:
                ckpt.atomic_save(files, self.run_dir / "best.pt")
        self.checkpointer.save({k: record[k] for k in ("epoch", "train_loss", "val_top1", "val_top5", "lr",
                                                       "images_per_s")},
                               self.position(epoch, 0, rng, None) if self.rank == 0 else None)
        self.last_saved = f"epoch {epoch + 1}"
        self.resizes, self.resize_unsaved = [], False


class MidEpochCheckpoint(Hook):
    """``train.checkpoint_every N``: save the training state after every N-th step of an epoch but the last;
    and after the first step of a group that changed size, whatever N: Ray Train grows a group by restarting
    it from the newest checkpoint, which without this could predate the resize, losing it from the record
    (metrics.jsonl's ``resizes``) along with all the smaller group trained."""

    def __init__(self, trainer: Trainer, every: int):
        self.trainer, self.every = trainer, every

    def after_step(self, at: Step, loss: torch.Tensor, batch_size: int, progress: EpochProgress) -> None:
        due = self.every and (at.step + 1) % self.every == 0
        if (due or self.trainer.resize_unsaved) and at.step + 1 < at.steps:
            self.trainer.save_mid_epoch(at)
