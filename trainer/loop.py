"""The training loop in plain torch: one step, one epoch, one evaluation.

Nothing here knows about Ray, checkpoints or run directories. What happens around a step (fault injection,
the NaN policy, progress lines, mid-epoch checkpoints) comes in as :class:`Hook` objects, so the loop below
reads top to bottom and runs the same in a Ray Train worker, under ``torchrun`` or in a notebook.

A step may add up the gradients of several micro-batches (``accumulate``, an elastic group's way of keeping
the global batch when it has fewer workers, docs/training.md): DDP all-reduces only at a step's last one
(``no_sync()`` before), and nothing in between waits for the device either.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from trainer.metrics import topk_correct


@dataclass(frozen=True)
class Step:
    """Where the loop is: 0-based ``epoch`` and ``step`` of ``steps`` per epoch."""
    epoch: int
    step: int
    steps: int

    @property
    def global_step(self) -> int:
        """1-based count of steps since the run began (the unit of ``fault.*_at_step``)."""
        return self.epoch * self.steps + self.step + 1

    def __str__(self) -> str:
        return f"epoch {self.epoch + 1} step {self.step + 1}/{self.steps} (global step {self.global_step})"


@dataclass
class EpochProgress:
    """This rank's running totals for the current epoch, kept on the device so a step never waits for the
    GPU; a mid-epoch checkpoint saves them (reading them there is one of the loop's few host syncs)."""
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    seen: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    skipped: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    # training images whose top-1 prediction (augmented crop, dropout on, before the step's update) was right
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def add(self, loss: torch.Tensor, batch_size: int, applied: torch.Tensor | None,
            correct: torch.Tensor | int = 0) -> None:
        """Count a step; one whose update was skipped (``applied`` False) adds no loss and no images."""
        if applied is None:
            self.loss_sum += loss.detach().double() * batch_size
            self.seen += batch_size
            self.correct += correct
        else:
            self.loss_sum += torch.where(applied, loss.detach().double() * batch_size, 0.0)
            self.seen += applied.long() * batch_size
            self.correct += applied.long() * correct
            self.skipped += (~applied).long()

    def state_dict(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "seen": int(self.seen), "skipped": int(self.skipped),
                "correct": int(self.correct)}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device) -> "EpochProgress":
        state = state or {}
        return cls(torch.tensor(state.get("loss_sum", 0.0), dtype=torch.float64, device=device),
                   torch.tensor(int(state.get("seen", 0)), device=device),
                   torch.tensor(int(state.get("skipped", 0)), device=device),
                   torch.tensor(int(state.get("correct", 0)), device=device))


class Hook:
    """What the loop calls around each training step. Every method's default does nothing."""

    def before_step(self, at: Step) -> None:
        """Before the forward pass (e.g. inject a fault)."""

    def on_loss(self, loss: torch.Tensor, at: Step) -> torch.Tensor:
        """The loss about to be back-propagated; may return a different one (e.g. an injected NaN)."""
        return loss

    def accept_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, at: Step) -> torch.Tensor | None:
        """A 0-d bool tensor on the device: False skips this step's update (without a host sync); None: no say."""
        return None

    def after_step(self, at: Step, loss: torch.Tensor, batch_size: int, progress: EpochProgress) -> None:
        """After the step, applied or skipped (e.g. a progress line, a mid-epoch checkpoint)."""


def autocast(bf16: bool, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
               optimizer: torch.optim.Optimizer, criterion, grad_clip: float = 0.0, bf16: bool = False,
               hooks: Sequence[Hook] = (), at: Step | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and gradient clipping; returns (loss, gradient norm). The update is the caller's."""
    loss, grad_norm, _ = counted_train_step(model, images, labels, optimizer=optimizer, criterion=criterion,
                                            grad_clip=grad_clip, bf16=bf16, hooks=hooks, at=at)
    return loss, grad_norm


def counted_train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                       optimizer: torch.optim.Optimizer, criterion, grad_clip: float = 0.0, bf16: bool = False,
                       hooks: Sequence[Hook] = (), at: Step | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`train_step` that also returns how many of the batch's top-1 predictions were right (a device
    tensor: the training error of section 3.1's Figure 1 comes from these, at no extra forward pass)."""
    return accumulate_step(model, [(images, labels)], optimizer=optimizer, criterion=criterion,
                           grad_clip=grad_clip, bf16=bf16, hooks=hooks, at=at)


def no_sync(model: torch.nn.Module, last: bool):
    """DDP's ``no_sync()`` for every micro-batch of a step but its last: gradients add up on each rank and are
    all-reduced once, with the last backward. A model without DDP (one rank) needs nothing."""
    return model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()


def accumulate_step(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                    optimizer: torch.optim.Optimizer, criterion, grad_clip: float = 0.0, bf16: bool = False,
                    hooks: Sequence[Hook] = (), at: Step | None = None,
                    loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`counted_train_step` over a step's micro-batches, their gradients added up; returns (the
    micro-batches' mean loss, gradient norm, top-1 hits over all of them). Each micro-batch's loss is multiplied
    by ``loss_scale`` before its backward: world size / micro-batches per global step, so that DDP's mean over
    ranks is the mean over the global batch even where ranks compute different numbers of micro-batches."""
    optimizer.zero_grad(set_to_none=True)
    total = correct = None
    for j, (images, labels) in enumerate(batches):
        with no_sync(model, j == len(batches) - 1):
            with autocast(bf16, images.device):
                logits = model(images)
            hits = (logits.detach().argmax(dim=1) == labels).sum()
            loss = criterion(logits.float(), labels)
            for hook in hooks:
                loss = hook.on_loss(loss, at)
            (loss * loss_scale).backward()
        total = loss.detach() if total is None else total + loss.detach()
        correct = hits if correct is None else correct + hits
    grads = [p for p in model.parameters() if p.grad is not None]
    grad_norm = (torch.nn.utils.clip_grad_norm_(grads, grad_clip) if grad_clip
                 else torch.nn.utils.get_total_norm([p.grad for p in grads]))
    return total / len(batches), grad_norm, correct


def gated_step(optimizer: torch.optim.Optimizer, applied: torch.Tensor | None) -> None:
    """``optimizer.step()``, skipped where the device flag ``applied`` is False without reading it on the host:
    fused optimizers take the flag as ``found_inf``, as under ``torch.amp.GradScaler``. Any other optimizer
    is stepped only after reading the flag (one host sync)."""
    if applied is None:
        optimizer.step()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = (~applied).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(applied):
        optimizer.step()


def train_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler,
                hooks: Sequence[Hook] = (), *, epoch: int, steps: int, first_step: int = 0,
                progress: EpochProgress | None = None, criterion=None, grad_clip: float = 0.0,
                bf16: bool = False, accumulate: int = 1, loss_scale: float = 1.0) -> EpochProgress:
    """Train over ``loader`` from ``first_step`` to ``steps``; return this rank's totals for the epoch.

    Each step takes ``accumulate`` batches from the loader (:func:`accumulate_step`; 1: :func:`train_step`).
    No line here waits for the device: the loss, totals and skip verdicts stay tensors, and hooks read them
    only when they must (a progress line, a checkpoint). ``scheduler.per_step`` says whether the learning rate
    moves every step (else the caller steps it per epoch). A skipped step (a hook's ``accept_step`` said no)
    still advances a per-step schedule, so the schedule does not depend on how many steps were skipped."""
    criterion = criterion or torch.nn.CrossEntropyLoss()
    progress = progress or EpochProgress()
    model.train()
    batches = iter(loader)
    for step in range(first_step, steps):
        group = list(itertools.islice(batches, accumulate))   # no batch is taken past the last step
        if len(group) < accumulate:
            break
        at = Step(epoch, step, steps)
        for hook in hooks:
            hook.before_step(at)
        loss, grad_norm, correct = accumulate_step(model, group, optimizer=optimizer, criterion=criterion,
                                                   grad_clip=grad_clip, bf16=bf16, hooks=hooks, at=at,
                                                   loss_scale=loss_scale)
        verdicts = [v for v in (hook.accept_step(loss, grad_norm, at) for hook in hooks) if v is not None]
        applied = torch.stack(verdicts).all() if verdicts else None
        gated_step(optimizer, applied)
        if scheduler.per_step:
            scheduler.step()
        samples = sum(labels.shape[0] for _, labels in group)
        progress.add(loss, samples, applied, correct)
        for hook in hooks:
            hook.after_step(at, loss, samples, progress)
    return progress


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, device: torch.device, *, bf16: bool = False,
             ten_crop: bool = False) -> dict[str, float]:
    """Summed (not averaged) loss, top-1 and top-5 hits and image count over the rows ``mask`` marks as real.

    The loader yields ``(images, labels, mask)``; with ``ten_crop`` images are (B, 10, C, H, W) and the
    softmax of the 10 patches is averaged (section 4.1 of the paper)."""
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = n = 0.0
    for images, labels, mask in loader:
        images, labels, mask = images.to(device), labels.to(device), mask.to(device)
        with autocast(bf16, device):
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
