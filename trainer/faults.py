"""Fault injection: real failures at chosen steps, for tests and fire drills (config section ``fault``).

``fault.kill_at_step``  SIGKILLs the worker process of ``fault.rank`` just before that step (a crashed node),
``fault.raise_at_step`` raises RuntimeError there (a bug or a lost device), ``fault.nan_at_step`` makes that
rank's loss NaN at that step (a diverging run), ``fault.hang_at_step`` stops that rank there for good (a hung
process: the other ranks wait in their next collective; a drill of whatever watches the run from outside).
Steps are global and 1-based (:attr:`trainer.loop.Step.global_step`).

Each fault fires once per run directory: ``RUN_DIR/faults/<name>`` is written just before it fires, so the
group Ray Train restarts from the last checkpoint runs through that step like an uninterrupted run would.
"""
from __future__ import annotations

import json
import os
import signal
import time
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


class KeyRecorder(Hook):
    """``fault.record_keys`` (tests, drills): which samples each step trained on, to check exactly-once epochs.

    :meth:`wrap` makes the training loader also yield each batch's sample keys and strips them again for the
    loop, keeping the keys of the batches taken since the last step; after each step this rank appends one line
    ``{"epoch", "step", "keys"}`` to ``RUN_DIR/keys/<group>-rank<r>of<world>.jsonl``, ``<group>`` being rank 0's
    start time in ns (all ranks construct this together). A step recorded by an earlier group and again by a later
    one was trained twice: the later group resumed before it (the earlier one's work on it was lost)."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, world: int):
        from trainer.distributed import from_rank0

        group = from_rank0(time.time_ns())
        self.path = Path(run_dir) / "keys" / f"{group}-rank{rank}of{world}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.taken: list[str] = []

    def wrap(self, loader):
        loader.with_source = True
        return _KeysTaken(loader, self.taken)

    def after_step(self, at: Step, loss: torch.Tensor, batch_size: int, progress) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": at.epoch, "step": at.step, "keys": self.taken}) + "\n")
        self.taken.clear()


class _KeysTaken:
    """A loader that yields ``(images, labels)`` and puts each batch's keys in ``sink``; the rest is the loader's."""

    def __init__(self, loader, sink: list[str]):
        self.__dict__.update(_loader=loader, _sink=sink)

    def __iter__(self):
        self._sink.clear()   # a new epoch or resume: batches taken before it were not trained on
        for images, labels, keys in self._loader:
            self._sink.extend(keys)
            yield images, labels

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __setattr__(self, name, value):
        setattr(self._loader, name, value)


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
        if f.hang_at_step == step and _fire_once(self.run_dir, f"hang_at_step_{step}"):
            print(f"[fault] rank {self.rank}: hangs before global step {step}", flush=True)
            while True:
                time.sleep(60)

    def on_loss(self, loss: torch.Tensor, at: Step) -> torch.Tensor:
        step = at.global_step
        if self.active and self.fault.nan_at_step == step and _fire_once(self.run_dir, f"nan_at_step_{step}"):
            return loss * float("nan")
        return loss
