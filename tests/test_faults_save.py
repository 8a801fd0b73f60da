"""Killed while saving: a process SIGKILLed in the middle of writing last.pt leaves the previous last.pt loadable."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

# Writes a ~100 MB model file over last.pt, slowly enough (a file object that sleeps between chunks) that the
# test can kill it while the temporary file is half written.
WRITER = r"""
import sys, time, torch
from trainer import checkpoint as ckpt
path = sys.argv[1]
real_save = torch.save
def slow_save(obj, f, *a, **k):
    class Slow:
        def __init__(self, f): self.f = f
        def write(self, b):
            time.sleep(0.02)
            return self.f.write(b)
        def __getattr__(self, name): return getattr(self.f, name)
    return real_save(obj, Slow(f), *a, **k)
torch.save = slow_save
ckpt.atomic_save({"model": {"w": torch.full((25_000_000,), 2.0)}, "meta": {"epoch": 1}}, path)
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.atomic_save({"model": {"w": torch.ones(10)}, "meta": {"epoch": 0}}, path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT)
    deadline = time.monotonic() + 120
    partial: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p.stat().st_size > 1_000_000]
        if partial:
            break
        time.sleep(0.05)
    assert partial and proc.poll() is None, "the writer finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    size = partial[0].stat().st_size
    assert 1_000_000 < size < 100_000_000                       # really interrupted mid-file

    saved = ckpt.load(path)                                      # the previous checkpoint, intact
    assert saved["meta"]["epoch"] == 0 and torch.equal(saved["model"]["w"], torch.ones(10))
    # what was left is a dot-file with a .tmp suffix, which nothing reads as a checkpoint
    assert partial[0].name.startswith(".last.pt.") and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.pt", partial[0].name])

    ckpt.atomic_save({"model": {"w": torch.zeros(10)}, "meta": {"epoch": 1}}, path)   # the next save works
    assert ckpt.load(path)["meta"]["epoch"] == 1
