"""Fault injection: real failures at chosen steps, for tests and fire drills (config section ``fault``).

``fault.kill_at_step``  SIGKILLs the worker process of ``fault.rank`` just before that step (a crashed node),
``fault.raise_at_step`` raises RuntimeError there (a bug or a lost device), ``fault.nan_at_step`` makes that
rank's loss NaN at that step (a diverging run). Steps are global and 1-based: step ``s`` of epoch ``e``
(both 0-based) is ``e * steps_per_epoch + s + 1``.

Each fault fires once per run directory: ``RUN_DIR/faults/<name>`` is written just before it fires, so the
group Ray Train restarts from the last checkpoint runs through that step like an uninterrupted run would.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from trainer.config import Config


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


def before_step(cfg: Config, rank: int, global_step: int) -> bool:
    """Kill or raise as configured; return True when this step's loss should be made NaN."""
    f = cfg.fault
    if rank != f.rank:
        return False
    run_dir = Path(cfg.run.out)
    if f.kill_at_step == global_step and _fire_once(run_dir, f"kill_at_step_{global_step}"):
        print(f"[fault] rank {rank}: SIGKILL before global step {global_step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if f.raise_at_step == global_step and _fire_once(run_dir, f"raise_at_step_{global_step}"):
        raise RuntimeError(f"injected fault: rank {rank} raised before global step {global_step} "
                           f"(fault.raise_at_step)")
    return f.nan_at_step == global_step and _fire_once(run_dir, f"nan_at_step_{global_step}")
