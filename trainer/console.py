"""What `python -m trainer fit` shows: the run's own lines, not Ray's.

Rank 0 appends its lines to ``RUN_DIR/train.log`` and keeps its step position in ``RUN_DIR/progress.json``
(:class:`RunLog`); the driver follows both (:class:`Follow`) and prints the lines. On a terminal it draws a
progress bar per epoch instead of the periodic step lines (they stay in train.log); elsewhere (a log file,
a job's output) it prints every line. The lines do not pass through Ray's worker-log forwarding, so they
carry no ``(RayTrainWorker pid=...)`` prefix, and rank 0's lines reach the driver the same way whether
the workers are Ray actors, torchrun processes or this process (local mode).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from shards import fileio

TRAIN_LOG = "train.log"
PROGRESS = "progress.json"
STEP_LINE = re.compile(r"^\[trainer\] epoch \d+/\d+ step \d+/\d+ ")


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RunLog:
    """Rank 0's output: ``log(line)`` appends to RUN_DIR/train.log; ``tick`` records the step for a bar."""

    def __init__(self, run_dir: str | Path, tick_every_s: float = 0.5):
        self.path, self.progress = Path(run_dir) / TRAIN_LOG, Path(run_dir) / PROGRESS
        self.tick_every_s, self.last_tick = tick_every_s, 0.0

    def __call__(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line.rstrip("\n") + "\n")

    def tick(self, state: dict[str, Any], force: bool = False) -> None:
        """At most every ``tick_every_s``: replace progress.json (a reader sees the old or the new one)."""
        now = time.monotonic()
        if not force and now - self.last_tick < self.tick_every_s:
            return
        self.last_tick = now
        fileio.write_text(self.progress, json.dumps(state))


class Follow:
    """The driver's side: print what rank 0 writes to train.log while the run goes on (a thread).

    Only lines written after it starts are shown (a resumed run's train.log holds the earlier ones too).
    With ``bar`` (stdout is a terminal) the periodic step lines are replaced by a tqdm bar per epoch."""

    def __init__(self, run_dir: str | Path, bar: bool | None = None, poll_s: float = 0.2):
        self.log, self.progress = Path(run_dir) / TRAIN_LOG, Path(run_dir) / PROGRESS
        self.bar_wanted = sys.stdout.isatty() if bar is None else bar
        self.poll_s = poll_s
        self.offset = self.log.stat().st_size if self.log.is_file() else 0
        self.progress_mtime = self.progress.stat().st_mtime_ns if self.progress.is_file() else 0
        self.partial = ""
        self.bar: Any = None
        self.bar_epoch: int | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="follow-train-log", daemon=True)

    def __enter__(self) -> "Follow":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()
        self._poll()           # whatever rank 0 wrote last
        self._close_bar()

    def _run(self) -> None:
        while not self.stopping.wait(self.poll_s):
            try:
                self._poll()
            except OSError:    # RUN_DIR not there yet, or a file replaced while read: next poll
                pass

    def _poll(self) -> None:
        if self.log.is_file():
            with open(self.log) as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
            *lines, self.partial = (self.partial + text).split("\n")
            for line in lines:
                self._show(line)
        if self.bar_wanted and self.progress.is_file():
            mtime = self.progress.stat().st_mtime_ns
            if mtime != self.progress_mtime:
                self.progress_mtime = mtime
                try:
                    self._update_bar(json.loads(self.progress.read_text()))
                except Exception:   # a bar that cannot be drawn must not stop the lines
                    self.bar_wanted = False

    def _show(self, line: str) -> None:
        if self.bar_wanted and STEP_LINE.match(line):
            return                                   # the bar shows it
        if self.bar is not None and line.startswith("[trainer] epoch "):
            self._close_bar()                        # the epoch's summary line replaces its bar
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def _update_bar(self, p: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar_epoch != p["epoch"]:
            self._close_bar()
            self.bar_epoch = p["epoch"]
            self.bar = tqdm(total=p["steps"], initial=p["step"], desc=f"epoch {p['epoch'] + 1}/{p['epochs']}",
                            unit="step", file=sys.stdout, leave=False,
                            ncols=shutil.get_terminal_size((100, 20)).columns)   # a terminal of size 0: 100
        self.bar.n = p["step"]
        loss = f"loss {p['loss']:.4f}, " if math.isfinite(p["loss"]) else ""   # known from the first line on
        self.bar.set_postfix_str(f"{loss}{p['images_per_s']:.1f} images/s, run ETA {duration(p['eta_s'])}",
                                 refresh=False)
        self.bar.refresh()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.bar_epoch = None, None


def summary(run_dir: str | Path, wall_s: float, ray_logs: str | None) -> list[str]:
    """The closing lines: best epoch and its top-1/top-5, wall time, training images/s, where the files are."""
    from trainer.metrics import read_metrics

    run = Path(run_dir)
    history = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
    if not history:
        return [f"[trainer] nothing trained in {duration(wall_s)}; run dir {run}"]
    best = max(history, key=lambda r: r["val_top1"])
    last = history[-1]
    rate = sum(r["images_per_s"] for r in history) / len(history)
    files = [name for name in ("best.pt", "last.pt", "metrics.jsonl", "curves.png", "tb", TRAIN_LOG)
             if (run / name).exists()]
    lines = [f"[trainer] done in {duration(wall_s)}: {last['epoch'] + 1} epochs, best epoch {best['epoch'] + 1}: "
             f"val top-1 {100 * best['val_top1']:.2f} %, top-5 {100 * best['val_top5']:.2f} %; "
             f"training {rate:.1f} images/s (mean over epochs)",
             f"[trainer] files in {run}: {', '.join(files)}"]
    if ray_logs:
        lines.append(f"[trainer] Ray's logs: {ray_logs} (--verbose shows them here)")
    return lines
