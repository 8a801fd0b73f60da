"""Optimizer and learning-rate schedules: the paper's plateau rule and the modern warm-up + cosine."""
from __future__ import annotations

import math

import torch

from trainer.config import Config


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.SGD:
    """SGD with momentum. With ``decay_biases=False`` biases get no weight decay (shrinking a bias toward
    zero does not regularise the function, it only fights the ReLU units' offsets)."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.decay_biases:
        groups = [{"params": params, "weight_decay": o.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    # fused: one kernel per device, and it can skip a step on a device-side flag (trainer/loop.py gated_step)
    optimizer = torch.optim.SGD(groups, lr=cfg.peak_lr(), momentum=o.momentum, nesterov=o.nesterov, fused=True)
    if o.momentum:   # the fused kernel leaves a first step's buffer uninitialised when that step is skipped;
        for p in params:   # a zero buffer gives the same first update (buf = momentum * 0 + grad)
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


class PlateauDivider:
    """Section 5: "divide the learning rate by 10 when the validation error rate stopped improving with
    the current learning rate ... reduced three times prior to termination".

    Called once per epoch, after validation, with val top-1. An epoch improves when its top-1 beats the best
    so far by more than ``min_delta`` (absolute top-1, e.g. 0.001 = 0.1 points), so a gain of a few images
    does not restart the count. After ``patience`` epochs in a row without improvement, every group's lr is
    multiplied by ``factor`` for the epochs that follow, at most ``max_reductions`` times, and the count
    restarts. (The paper gives neither patience nor min_delta.)
    """
    per_step = False

    def __init__(self, optimizer: torch.optim.Optimizer, factor: float = 0.1, patience: int = 2,
                 max_reductions: int = 3, min_delta: float = 0.0):
        self.optimizer, self.factor, self.patience, self.max_reductions = optimizer, factor, patience, max_reductions
        self.min_delta = min_delta
        self.best, self.bad_epochs, self.reductions = -math.inf, 0, 0

    def step(self, val_top1: float) -> None:
        if val_top1 > self.best + self.min_delta:
            self.best, self.bad_epochs = val_top1, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience and self.reductions < self.max_reductions:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.factor
            self.reductions += 1
            self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "reductions": self.reductions}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs, self.reductions = state["best"], state["bad_epochs"], state["reductions"]


class WarmupCosine:
    """Per step: linear warm-up from ``warmup_start * lr`` to ``lr`` over the first ``warmup_steps``, then
    cosine decay to ``final_fraction * lr`` at ``total_steps``. Stateless apart from the step count."""
    per_step = True

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 warmup_start: float = 0.1, final_fraction: float = 0.0):
        self.optimizer, self.total_steps, self.warmup_steps = optimizer, max(1, total_steps), warmup_steps
        self.warmup_start, self.final_fraction = warmup_start, final_fraction
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.steps_done = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (1 - self.warmup_start) * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        f = self.factor(self.steps_done)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self, *_ignored) -> None:
        self.steps_done += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done, self.base_lrs = state["steps_done"], list(state["base_lrs"])
        self._apply()


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    s = cfg.schedule
    if s.kind == "plateau":
        return PlateauDivider(optimizer, s.factor, s.patience, s.max_reductions, s.min_delta)
    return WarmupCosine(optimizer, total_steps=cfg.train.epochs * steps_per_epoch,
                        warmup_steps=round(s.warmup_epochs * steps_per_epoch),
                        warmup_start=s.warmup_start, final_fraction=s.final_fraction)
