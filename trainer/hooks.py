"""Loop hooks every run uses: the NaN policy and the progress lines (fault injection is in trainer/faults.py)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from trainer.console import duration
from trainer.distributed import all_reduce_sum_
from trainer.loop import EpochProgress, Hook, Step


class NonFiniteStep(RuntimeError):
    """A step whose loss (summed over ranks) or gradient norm is NaN/inf, with ``train.skip_nonfinite`` off."""

    def __init__(self, at: Step, loss_total: float, grad_norm: float):
        super().__init__(f"non-finite loss or gradients at {at}")
        self.at, self.loss_total, self.grad_norm = at, loss_total, grad_norm


class NonFinitePolicy(Hook):
    """Skip the update of a step whose loss or gradients are NaN/inf; without ``skip``, also stop the run
    (raise :class:`NonFiniteStep`) when that is noticed.

    The verdict stays on the device: the loss summed over ranks and the gradient norm (the same on every
    rank after DDP's all-reduce) are checked there, the update is gated on the result (loop.gated_step),
    and the first bad step is remembered in tensors. They are read on the host only at ``read_points``
    steps: every ``train.log_every`` steps, before each mid-epoch checkpoint and at the epoch's last step.
    So a bad step may be reported a few steps late, but its update never happened, every rank reaches the
    same verdict, and a stop always comes before any checkpoint that would include steps after it."""

    def __init__(self, skip: bool, read_every: int, checkpoint_every: int = 0, log: Callable[[str], None] = print):
        self.skip, self.read_every, self.checkpoint_every, self.log = skip, read_every, checkpoint_every, log
        self.first_bad: torch.Tensor | None = None   # global step of the first bad one since the last read; 0: none
        self.bad_values = self.bad_count = None

    def accept_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, at: Step) -> torch.Tensor:
        values = all_reduce_sum_(torch.stack([loss.detach().double(), grad_norm.detach().double()]))
        ok = torch.isfinite(values).all()
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.int64, device=values.device)
            self.bad_values, self.bad_count = torch.zeros_like(values), torch.zeros_like(self.first_bad)
        new = (~ok) & (self.first_bad == 0)
        self.first_bad = torch.where(new, at.global_step, self.first_bad)
        self.bad_values = torch.where(new, values, self.bad_values)
        self.bad_count += (~ok).long()
        return ok

    def after_step(self, at: Step, loss: torch.Tensor, batch_size: int, progress: EpochProgress) -> None:
        done = at.step + 1
        if done % self.read_every == 0 or done == at.steps or (self.checkpoint_every and done % self.checkpoint_every == 0):
            self.read(at.steps)

    def read(self, steps: int) -> None:
        """The host sync: report (skip) or raise (stop) for a bad step since the last read."""
        first = int(self.first_bad) if self.first_bad is not None else 0
        if not first:
            return
        at = Step((first - 1) // steps, (first - 1) % steps, steps)
        loss_total, norm = self.bad_values.tolist()
        if not self.skip:
            raise NonFiniteStep(at, loss_total, norm)
        more = int(self.bad_count) - 1
        self.log(f"[trainer] skipped {at}: non-finite loss or gradients (train.skip_nonfinite)"
                 + (f"; {more} more step(s) skipped since" if more else ""))
        self.first_bad.zero_()
        self.bad_count.zero_()


class ProgressLog(Hook):
    """A line every ``every`` steps and at the epoch's last step: loss, learning rate, images/s (all ranks) and
    the run's ETA (training steps left at this epoch's rate; validation not counted). ``tick``, when given,
    gets the same figures after every step (a progress bar's feed: trainer/console.py)."""

    def __init__(self, every: int, epochs: int, world: int, optimizer: torch.optim.Optimizer,
                 log: Callable[[str], None] = print, tick: Callable[..., None] | None = None, global_batch: int = 0):
        """``global_batch``: the images of one step over all ranks (0: a step's batch times ``world``; ranks of an
        elastic group may compute different numbers of micro-batches)."""
        self.every, self.epochs, self.world, self.optimizer, self.log = every, epochs, world, optimizer, log
        self.tick, self.last_loss, self.global_batch = tick, float("nan"), global_batch
        self.start_epoch()

    def start_epoch(self) -> None:
        self.window_start, self.window_images = time.perf_counter(), 0
        self.epoch_start, self.epoch_steps = self.window_start, 0

    def eta_s(self, at: Step, now: float) -> float:
        left = (at.steps - at.step - 1) + (self.epochs - at.epoch - 1) * at.steps
        return left * (now - self.epoch_start) / max(1, self.epoch_steps)

    def after_step(self, at: Step, loss: torch.Tensor, batch_size: int, progress: EpochProgress) -> None:
        self.window_images += self.global_batch or batch_size * self.world
        self.epoch_steps += 1
        line_due = not (at.step + 1) % self.every or at.step + 1 == at.steps
        if not line_due and self.tick is None:
            return
        now = time.perf_counter()
        eta = self.eta_s(at, now)
        if line_due:   # the loss is read (a host sync) only for a line, never for a tick
            self.last_loss = float(loss.detach())
            self.log(f"[trainer] epoch {at.epoch + 1}/{self.epochs} step {at.step + 1}/{at.steps} "
                     f"loss {self.last_loss:.4f} lr {self.optimizer.param_groups[0]['lr']:.4g} "
                     f"{self.window_images / (now - self.window_start):.1f} images/s ETA {duration(eta)}")
            self.window_start, self.window_images = now, 0
        if self.tick is not None:
            rate = self.epoch_steps * (self.global_batch or batch_size * self.world) / max(1e-9, now - self.epoch_start)
            self.tick({"epoch": at.epoch, "epochs": self.epochs, "step": at.step + 1, "steps": at.steps,
                       "loss": self.last_loss, "images_per_s": rate, "eta_s": eta}, force=at.step + 1 == at.steps)
