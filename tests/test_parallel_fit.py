"""`python -m trainer fit --parallel model` for real: the model split over two CPU devices inside a rank, on the
digits shards, through fit's own worker path in Ray Train's local mode (`--workers 0`, in this process).

The same command with `--parallel data` is the baseline: with the same seed and dropout 0 (the two forms draw
different dropout masks) the loss curve and the final weights agree to float tolerance. DDP across processes
over the split model (ranks kept identical) is tests/test_parallel_ddp.py."""
from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from trainer.cli import main
from trainer.metrics import read_metrics
from trainer.model import AlexNet

pytestmark = pytest.mark.slow
COMMON = ["--workers", "0", "--batch-size", "16", "--width", "0.125", "--loader", "dali", "--epochs", "2",
          "--set", "data.image_size=64", "--set", "data.num_threads=1", "--set", "model.dropout=0",
          "--set", "train.max_steps_per_epoch=8", "--set", "train.log_every=2", "--set", "optim.lr=0.05",
          "--set", "schedule.kind=plateau", "--set", "run.save_rank_states=true",
          # the paper's LRN alpha keeps this tiny net away from near-ties where the two forms' float differences
          # (which depend on oneDNN's thread count) flip a unit over 16 steps (see tests/test_parallel.py)
          "--set", "model.lrn_alpha_convention=paper"]


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_fit")
    data = ["--train", str(digits_shards.train), "--val", str(digits_shards.val)]
    logs = {}
    for mode in ("data", "model"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["fit", *data, "--out", str(root / mode), *COMMON, "--parallel", mode,
                         "--gpus-per-worker", "0"])
        logs[mode] = out.getvalue()
        assert code == 0, logs[mode][-3000:]
    return {"data": root / "data", "model": root / "model", "logs": logs}


def step_losses(log: str) -> list[tuple[int, int, float]]:
    """(epoch, step, loss) from rank 0's progress lines, in order."""
    return [(int(e), int(s), float(loss)) for e, s, loss in
            re.findall(r"\[trainer\] epoch (\d+)/\d+ step (\d+)/\d+ loss ([\d.]+)", log)]


def test_split_workers_follow_the_data_parallel_loss_curve(runs):
    curve = {mode: step_losses(runs["logs"][mode]) for mode in ("data", "model")}
    points = [(e, s) for e, s, _ in curve["model"]]
    assert points == [(e, s) for e, s, _ in curve["data"]] == [(e, s) for e in (1, 2) for s in (2, 4, 6, 8)]
    for (_, _, d), (_, _, m) in zip(curve["data"], curve["model"], strict=True):
        assert m == pytest.approx(d, abs=2e-4)                           # printed with 4 decimals
    data, model = read_metrics(runs["data"]), read_metrics(runs["model"])
    assert [r["epoch"] for r in model] == [0, 1]
    assert data[-1]["train_loss"] < data[0]["train_loss"]             # training really moved
    for d, m in zip(data, model):
        assert m["workers"] == d["workers"] == 1
        assert m["train_loss"] == pytest.approx(d["train_loss"], rel=1e-4)
        assert m["val_loss"] == pytest.approx(d["val_loss"], rel=1e-4)
        assert abs(m["val_top1"] - d["val_top1"]) <= 2 / m["val_n"]     # a near-tie may flip one image


def test_split_run_ends_with_the_data_parallel_weights_under_single_device_names(runs):
    final = {mode: torch.load(runs[mode] / "rank_states" / "rank0.pt", weights_only=True) for mode in ("data", "model")}
    assert list(final["model"]) == list(AlexNet().state_dict())          # the split saves single-device keys
    for name, tensor in final["model"].items():
        torch.testing.assert_close(tensor, final["data"][name], atol=1e-4, rtol=1e-3, msg=name)


def test_split_runs_best_pt_loads_into_the_single_device_model(runs):
    saved = torch.load(runs["model"] / "best.pt", weights_only=True)
    weights = saved["model"] if "model" in saved else saved
    net = AlexNet(num_classes=10, width=0.125, image_size=64, lrn_alpha="paper")
    net.load_state_dict(weights)                                          # strict: same keys and shapes


def test_model_parallel_needs_two_devices_per_worker(digits_shards, tmp_path, run_main):
    """One GPU per worker cannot hold two columns: refused before any worker starts."""
    out = run_main("trainer", "fit", "--train", digits_shards.train, "--val", digits_shards.val,
                   "--out", tmp_path / "run", "--parallel", "model", "--gpus-per-worker", "1")
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()[-1]
    assert "--parallel model" in message and "two devices" in message, out.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
