"""Per-epoch bookkeeping on rank 0: RUN_DIR/metrics.jsonl, TensorBoard events under RUN_DIR/tb, RUN_DIR/curves.png.

Also the small pure helpers the training loop uses for accuracy counts.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from shards.fileio import atomic_write, write_text

REQUIRED_KEYS = ("epoch", "train_loss", "val_top1", "val_top5", "lr", "images_per_s")


def topk_correct(logits_or_probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                 ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of rows (where ``mask`` is True) whose label is among the top-k scores, for each k."""
    if mask is not None:
        logits_or_probs, labels = logits_or_probs[mask], labels[mask]
    out = {}
    k_max = min(max(ks), logits_or_probs.shape[1])
    top = logits_or_probs.topk(k_max, dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    for k in ks:
        out[k] = int(hit[:, :k].any(dim=1).sum())
    return out


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Append one JSON object per epoch; mirror it to TensorBoard; redraw curves.png.

    On resume, lines for epochs at or after the resumed epoch are dropped first, so a run that died after
    writing a line but before its checkpoint was committed does not list that epoch twice.
    """

    def __init__(self, run_dir: str | os.PathLike, start_epoch: int):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.run_dir) if r["epoch"] < start_epoch]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.history = kept
        self.tb = _tensorboard_writer(self.run_dir / "tb")

    def log(self, record: dict[str, Any]) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"metrics record lacks {missing}")
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.history.append(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["epoch"])
            self.tb.flush()
        plot_curves(self.history, self.run_dir / "curves.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl and curves.png still work
        return None
    return SummaryWriter(log_dir=str(log_dir))


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss and accuracy against epoch (1-based on the axis), written atomically."""
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    if all("val_loss" in r for r in history):
        ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val loss")
    ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("cross-entropy"), ax_loss.legend(), ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [100 * r["val_top1"] for r in history], "o-", label="val top-1")
    ax_acc.plot(epochs, [100 * r["val_top5"] for r in history], "o-", label="val top-5")
    ax_acc.set_xlabel("epoch"), ax_acc.set_ylabel("accuracy (%)"), ax_acc.set_ylim(0, 100)
    ax_acc.legend(), ax_acc.grid(alpha=0.3)
    fig.suptitle(f"{Path(path).parent.name}: best val top-1 {100 * max(r['val_top1'] for r in history):.1f} %")
    fig.tight_layout()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, dpi=80, format="png")
    finally:
        plt.close(fig)
