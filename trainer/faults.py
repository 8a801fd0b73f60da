"""Fault injection: real failures at chosen steps, for tests and fire drills (config section ``fault``).

``fault.kill_at_step``  SIGKILLs the worker process of ``fault.rank`` just before that step (a crashed node),
``fault.raise_at_step`` raises RuntimeError there (a bug or a lost device), ``fault.nan_at_step`` makes that
rank's loss NaN at that step (a diverging run). Steps are global and 1-based (:attr:`trainer.loop.Step.global_step`).

Each fault fires once per run directory: ``RUN_DIR/faults/<name>`` is written just before it fires, so the
group Ray Train restarts from the last checkpoint runs through that step like an uninterrupted run would.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from trainer.config import FaultConfig
from trainer.loop import Hook, Step


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (a non-finite loss): retrying would fail the same way, so it is not retried."""


def _fire_once(run_dir: Path, name: str) -> bool:
    """True the first time ``name`` fires in this run directory (the marker is on disk before it fires)."""
    marker = run_dir / "faults" / name
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"fired by pid {os.getpid()}\n")
    return True


class FaultInjector(Hook):
    """The ``fault.*`` knobs as a loop hook; inert on every rank but ``fault.rank``."""

    def __init__(self, fault: FaultConfig, run_dir: str | os.PathLike, rank: int):
        self.fault, self.run_dir, self.active = fault, Path(run_dir), rank == fault.rank
        self.rank = rank

    def before_step(self, at: Step) -> None:
        f, step = self.fault, at.global_step
        if not self.active:
            return
        if f.kill_at_step == step and _fire_once(self.run_dir, f"kill_at_step_{step}"):
            print(f"[fault] rank {self.rank}: SIGKILL before global step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if f.raise_at_step == step and _fire_once(self.run_dir, f"raise_at_step_{step}"):
            raise RuntimeError(f"injected fault: rank {self.rank} raised before global step {step} "
                               f"(fault.raise_at_step)")

    def on_loss(self, loss: torch.Tensor, at: Step) -> torch.Tensor:
        step = at.global_step
        if self.active and self.fault.nan_at_step == step and _fire_once(self.run_dir, f"nan_at_step_{step}"):
            return loss * float("nan")
        return loss
