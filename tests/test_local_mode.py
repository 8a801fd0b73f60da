"""`fit --workers 0`: Ray Train's local mode, in this very process (no Ray cluster, no actors).

The same Trainer as with workers, so the same files and the same resume: a run stopped by a NaN in the middle
of an epoch and rerun must end bit-identical to one that never stopped, from the mid-epoch checkpoint that
local mode keeps on the storage path itself.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch

from trainer.cli import main
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow
RECIPE = ["--workers", "0", "--batch-size", "32", "--width", "0.125", "--loader", "dali", "--epochs", "2",
          "--set", "data.image_size=64", "--set", "data.num_threads=1", "--set", "train.max_steps_per_epoch=6",
          "--set", "train.checkpoint_every=2", "--set", "train.log_every=3"]


def fit(shards, out: Path, *extra: str) -> int:
    return main(["fit", "--train", str(shards.train), "--val", str(shards.val), "--out", str(out), *RECIPE, *extra])


@pytest.fixture(scope="module")
def local_runs(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    codes = {"a": fit(digits_shards, root / "a")}
    # NaN at global step 9 (epoch 2, step 3/6): stops after the checkpoint at epoch 2 step 2, then resumes there;
    # on a side stream, which on the CPU must change nothing (run "a" is on the default one)
    side = ("--set", "fault.nan_at_step=9", "--set", "train.cuda_stream=side")
    codes["b1"] = fit(digits_shards, root / "b", *side)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        codes["b2"] = fit(digits_shards, root / "b", *side)
    return root, codes, out.getvalue()


def test_local_mode_writes_what_a_worker_group_writes(local_runs):
    root, codes, _ = local_runs
    assert codes["a"] == 0
    run = root / "a"
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1]
    assert {r["workers"] for r in read_metrics(run)} == {1}
    for name in ("config.json", "last.pt", "best.pt", "curves.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    checkpoints = sorted((run / "ray").glob("checkpoint_*/checkpoint.pt"))
    assert len(checkpoints) in (1, 2)                        # the newest two are kept
    state = torch.load(checkpoints[-1], weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 0


def test_local_mode_resumes_mid_epoch_and_matches_the_uninterrupted_run(local_runs):
    root, codes, rerun_log = local_runs
    assert codes["b1"] == 3 and codes["b2"] == 0              # 3: stopped on purpose (NaN), then finished
    assert "at epoch 2/2 step 3/6" in rerun_log, rerun_log
    got, want = read_metrics(root / "b"), read_metrics(root / "a")
    assert [r["epoch"] for r in got] == [0, 1]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    a = torch.load(root / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(root / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _break_model(checkpoint_dir: Path) -> None:
    """A training state that still loads, with one layer that is not this model's."""
    path = checkpoint_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["fc8.weight"] = torch.zeros(3, 3)
    torch.save(state, path)


def test_a_checkpoint_that_does_not_fit_is_skipped_and_none_fitting_is_one_line(local_runs, digits_shards, tmp_path,
                                                                                capsys):
    root, _, _ = local_runs
    run = tmp_path / "run"
    shutil.copytree(root / "a", run)
    older, newest = sorted((run / "ray").glob("checkpoint_*"))   # epoch 2 after step 4, epoch 2's end
    _break_model(newest)
    capsys.readouterr()
    assert fit(digits_shards, run, "--epochs", "3") == 0
    out = capsys.readouterr().out
    assert f"not resuming from {newest}: it does not fit this model (fc8.weight is (3, 3)" in out, out
    assert f"resumed from {older} at epoch 2/3 step 5/6" in out, out
    for checkpoint in (run / "ray").glob("checkpoint_*"):
        _break_model(checkpoint)
    assert fit(digits_shards, run, "--epochs", "4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / 'ray'}: no checkpoint there fits this model"), err
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1, 2]    # nothing trained, nothing lost
