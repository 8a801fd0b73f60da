"""The trainer for real on the digits shards: training, resuming, eval and predict.

Run A trains 3 epochs straight; run B trains 2 epochs, then the same command with --epochs 3 resumes it. With
the same seed run B must end bit-identical to run A, which holds only if the parameters, optimizer state,
scheduler state, epoch and RNG state were all restored exactly. Neither tests anything of Ray's or of several
ranks, so both run in this process (`--workers 0`, Ray Train's local mode: no start-up paid per run); Ray Train's
worker groups, their restarts and resumes, and DDP's ranks are tests/test_faults.py's. The evaluation spreads over
the session's local Ray cluster.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from shards.manifest import load_classes, load_manifest
from trainer.cli import main
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow
SMALL = ["--workers", "0", "--batch-size", "32", "--width", "0.25", "--loader", "dali",
         "--set", "data.image_size=64", "--set", "data.num_threads=1", "--set", "schedule.kind=plateau",
         "--set", "optim.lr=0.08", "--set", "train.log_every=10", "--set", "data.flip=false",
         "--set", "train.max_steps_per_epoch=20"]


def fit(*args: str) -> str:
    """``fit ARGS`` in this process; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["fit", *args])
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = ["--train", str(digits_shards.train), "--val", str(digits_shards.val)]
    a = [*data, "--out", str(root / "a"), *SMALL, "--epochs", "3"]
    b = [*data, "--out", str(root / "b"), *SMALL]
    logs = {"a": fit(*a), "b1": fit(*b, "--epochs", "2"), "b2": fit(*b, "--epochs", "3")}
    return {"a": root / "a", "b": root / "b", "logs": logs}


def test_loss_falls_and_val_top1_beats_chance(runs, digits_shards):
    history = read_metrics(runs["a"])
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.3
    assert history[-1]["val_top1"] > 0.5                       # chance is 0.1 (10 digits)
    assert all(r["val_n"] == load_manifest(digits_shards.val)["num_samples"] for r in history)
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 for r in history)
    assert "images/s" in runs["logs"]["a"]                     # the progress line
    assert (runs["a"] / "curves.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (runs["a"] / "tb").iterdir())


def test_last_and_best_are_plain_weights_only_model_files(runs, digits_shards):
    history = read_metrics(runs["a"])
    best = torch.load(runs["a"] / "best.pt", weights_only=True)
    last = torch.load(runs["a"] / "last.pt", weights_only=True)
    assert best["meta"]["classes"] == load_classes(digits_shards.train)
    assert last["meta"]["epoch"] == 2
    assert best["meta"]["val_top1"] == max(r["val_top1"] for r in history)
    assert not [p for p in runs["a"].iterdir() if p.name.endswith(".tmp")]
    # the last and the best checkpoint only (local mode keeps the newest two on the storage path)
    for run in (runs["a"], runs["b"]):
        assert len([p for p in (run / "ray").glob("checkpoint_*") if p.is_dir()]) in (1, 2)


def test_rerun_resumes_at_the_next_epoch_with_exactly_the_saved_state(runs):
    assert "resumed from" not in runs["logs"]["b1"]
    assert "resumed from" in runs["logs"]["b2"] and "at epoch 3/3" in runs["logs"]["b2"]
    assert [r["epoch"] for r in read_metrics(runs["b"])] == [0, 1, 2]
    a, b = read_metrics(runs["a"]), read_metrics(runs["b"])
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["val_top1"] for r in a] == [r["val_top1"] for r in b]
    last_a = torch.load(runs["a"] / "last.pt", weights_only=True)["model"]
    last_b = torch.load(runs["b"] / "last.pt", weights_only=True)["model"]
    for key in last_a:
        assert torch.equal(last_a[key], last_b[key]), key


def test_eval_counts_every_val_image_once_for_1_2_3_workers(runs, digits_shards, ray_cluster):
    """1 worker in this process, 2 as Ray tasks, 3 as this process's three ranks in turn (the split's arithmetic,
    without a third Ray worker process)."""
    from trainer.evaluate import eval_rank, evaluate

    n = load_manifest(digits_shards.val)["num_samples"]
    checkpoint, val = str(runs["a"] / "last.pt"), str(digits_shards.val)
    results = [evaluate(checkpoint, val, workers=w) for w in (1, 2)]
    thirds = [eval_rank(checkpoint, val, r, 3, False, "dali", 64, 1) for r in range(3)]
    results.append({k: sum(t[k] for t in thirds) / (n if k != "n" else 1) for k in ("top1", "top5", "n")})
    assert [r["n"] for r in results] == [n, n, n]
    # the same images, the same weights: the same hits whatever the split
    assert len({round(r["top1"] * n) for r in results}) == 1 and len({round(r["top5"] * n) for r in results}) == 1
    assert results[0]["top1"] == pytest.approx(read_metrics(runs["a"])[-1]["val_top1"], abs=1.5 / n)
    ten = evaluate(str(runs["a"] / "last.pt"), str(digits_shards.val), ten_crop=True, workers=2)
    assert ten["n"] == n and ten["top1"] > 0.5


def test_eval_cli_prints_one_json_line(runs, digits_shards, run_main):
    out = run_main("trainer", "eval", "--checkpoint", runs["a"] / "best.pt", "--data", digits_shards.val)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == {"top1", "top5", "n"} and result["n"] == load_manifest(digits_shards.val)["num_samples"]


def test_bad_inputs_exit_nonzero_with_one_line(tmp_path, digits_shards, run_main):
    # in process; tests/test_bad_input.py also runs each command in a fresh interpreter
    out = run_main("trainer", "eval", "--checkpoint", tmp_path / "none.pt", "--data", digits_shards.val)
    assert out.returncode == 2 and "none.pt" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_main("trainer", "fit", "--train", digits_shards.train, "--val", digits_shards.val,
                   "--out", tmp_path / "r", "--set", "optim.momentun=0.9")
    assert out.returncode == 2 and "optim.momentun" in out.stderr
    assert not (tmp_path / "r").exists()
