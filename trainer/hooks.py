"""Loop hooks every run uses: the NaN policy and the progress lines (fault injection is in trainer/faults.py)."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from trainer.distributed import all_reduce_sum
from trainer.loop import EpochProgress, Hook, Step


class NonFiniteStep(RuntimeError):
    """A step whose loss (summed over ranks) or gradient norm is NaN/inf, with ``train.skip_nonfinite`` off."""

    def __init__(self, at: Step, loss_total: float, grad_norm: float):
        super().__init__(f"non-finite loss or gradients at {at}")
        self.at, self.loss_total, self.grad_norm = at, loss_total, grad_norm


class NonFinitePolicy(Hook):
    """Stop (raise :class:`NonFiniteStep`) or skip a step whose loss or gradients are NaN/inf.

    The gradient norm is taken after DDP's all-reduce, so it is the same on every rank, and the losses are
    summed over ranks: every rank reaches the same verdict and they stop or skip together."""

    def __init__(self, skip: bool, log: Callable[[str], None] = print):
        self.skip, self.log = skip, log

    def accept_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, at: Step) -> bool:
        loss_total, norm = all_reduce_sum([float(loss.detach()), float(grad_norm)], loss.device)
        if math.isfinite(loss_total) and math.isfinite(norm):
            return True
        if not self.skip:
            raise NonFiniteStep(at, loss_total, norm)
        self.log(f"[trainer] skipped {at}: non-finite loss or gradients (train.skip_nonfinite)")
        return False


class ProgressLog(Hook):
    """A line every ``every`` steps and at the epoch's last step: loss, learning rate, images/s (all ranks)."""

    def __init__(self, every: int, epochs: int, world: int, optimizer: torch.optim.Optimizer,
                 log: Callable[[str], None] = print):
        self.every, self.epochs, self.world, self.optimizer, self.log = every, epochs, world, optimizer, log
        self.window_start, self.window_images = time.perf_counter(), 0

    def start_epoch(self) -> None:
        self.window_start, self.window_images = time.perf_counter(), 0

    def after_step(self, at: Step, loss: torch.Tensor, batch_size: int, progress: EpochProgress) -> None:
        self.window_images += batch_size * self.world
        if (at.step + 1) % self.every and at.step + 1 != at.steps:
            return
        now = time.perf_counter()
        self.log(f"[trainer] epoch {at.epoch + 1}/{self.epochs} step {at.step + 1}/{at.steps} "
                 f"loss {float(loss.detach()):.4f} lr {self.optimizer.param_groups[0]['lr']:.4g} "
                 f"{self.window_images / (now - self.window_start):.1f} images/s")
        self.window_start, self.window_images = now, 0
