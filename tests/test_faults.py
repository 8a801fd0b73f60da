"""Faults for real: Ray Train workers killed (SIGKILL) and raising mid-epoch, a NaN loss, the whole cluster stopped.

Every run is the same tiny recipe (width 0.125, 64 px, 2 CPU workers, 2 epochs of 8 steps, a checkpoint every
3 steps, the modern preset's per-step cosine schedule) on the digits shards, with the same seed. The
uninterrupted run A is the yardstick: a run that survives a fault must end with exactly A's weights and
metrics, which holds only if the model, optimizer, scheduler, RNG states, running loss and every rank's
data position (DALI pipeline checkpoint) were restored where the last checkpoint was taken. A's two ranks
also save their own models, which DDP must keep identical.

Failures come from the ``fault.*`` config knobs (trainer/faults.py: a real SIGKILL, a real exception, a real
NaN in the loss). Run B meets three of them, one command run twice on the session's local Ray cluster
(RAY_ADDRESS): a worker killed (Ray Train restarts the group), then a NaN loss (the run stops, not retried);
the same command again resumes, then a worker raises (restarted again) and the run ends. Run E starts its own
cluster and is killed with it. Runs A and D test nothing of Ray's (A is the yardstick, D's skip is agreed
between the ranks by torch.distributed), so they run as `torchrun` with two processes and `--workers 0`,
local mode's form for several ranks, which makes the same steps: that A, run so, is the yardstick of the Ray
runs B and E also proves it. A, B and D run side by side; E, which starts a Ray cluster of its own, comes
after them: on two busy cores a node started amid the others' start-up has missed Ray's start-up limits (its
dashboard agent, importing for over 30 s, never reported its ports and the raylet gave up).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bench.reclaim import descendants, running
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["--workers", "2", "--batch-size", "32", "--width", "0.125", "--loader", "dali", "--epochs", "2",
          "--set", "data.image_size=64", "--set", "data.num_threads=1", "--set", "train.max_steps_per_epoch=8",
          "--set", "train.checkpoint_every=3", "--set", "train.log_every=4",
          # no preemption checks: each worker group would start Ray Train's preemption watcher, an actor of its own
          # (the notices, with restarts and resizes, are tests/test_elastic.py's and tests/test_preemption.py's)
          "--set", "run.preemption_check_every=0"]


def fit_cmd(shards, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "fit", "--train", str(shards.train), "--val", str(shards.val),
            "--out", str(out), *RECIPE, *extra]


def torchrun_cmd(shards, out: Path, *extra: str) -> list[str]:
    """The same run as two torchrun processes in local mode (`--workers 0`): ranks 0 and 1, no Ray cluster."""
    command = fit_cmd(shards, out, *extra, "--workers", "0")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command[1:]]


def start(cmd: list[str], log: Path, ray_address: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, expect: int = 0) -> str:
    proc.wait(timeout=600)
    text = log.read_text()
    assert proc.returncode == expect, text[-4000:]
    return text


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = read_metrics(run), read_metrics(reference)
    assert [r["epoch"] for r in got] == [0, 1]                      # each epoch once
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    a, b = weights(run), weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in b)


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if running(pid)}


def fit(cmd: list[str], log: Path, ray_address: str | None, expect: int = 0) -> str:
    return finish(start(cmd, log, ray_address), log, expect)


def kill_cluster_then_rerun(cmd: list[str], run: Path, root: Path) -> tuple[dict[str, str], dict]:
    """Run E: its own local Ray cluster (no RAY_ADDRESS), killed with the whole process tree in epoch 2, where
    rank 0 hangs before global step 12 (``fault.hang_at_step``: the run stands still there, however fast this
    machine is today), then the same command again, which does not hang (the fault fired once for this RUN_DIR).
    Returns its two logs and the Ray processes that outlived the killed driver."""
    proc = start([*cmd, "--set", f"fault.hang_at_step={HANG_AT}", "--set", "fault.rank=0"], root / "e1.log", None)
    # the driver's log, not the fault's marker file: Ray forwards the worker's line to the driver a moment later
    hangs, deadline = f"[fault] rank 0: hangs before global step {HANG_AT}", time.monotonic() + 400
    while hangs not in (root / "e1.log").read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, (root / "e1.log").read_text()[-3000:]
    tree = descendants(proc.pid)
    assert len(tree) >= 3                                         # GCS, raylet, workers, ...
    os.kill(proc.pid, signal.SIGKILL)                             # the driver that started the cluster
    proc.wait()
    deadline = time.monotonic() + 5   # Ray's agents outlive their driver whatever the wait: only report them
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    survivors = {pid: (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                 for pid in alive(tree)}
    for pid in survivors:  # Ray processes that outlived the driver: stop them too (only processes this test started)
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    assert not alive(tree)                                        # the whole cluster is gone before the rerun
    logs = {"e1": (root / "e1.log").read_text(), "e2": fit([*cmd, "--set", f"fault.hang_at_step={HANG_AT}",
                                                            "--set", "fault.rank=0"], root / "e2.log", None)}
    return logs, survivors


HANG_AT = 12   # run E's rank 0 hangs before global step 12 (epoch 2 step 4/8)


@pytest.fixture(scope="module")
def runs(digits_shards, ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cmds = {
        "a": torchrun_cmd(digits_shards, root / "a", "--set", "run.save_rank_states=true"),
        # rank 1 is SIGKILLed before global step 6 (epoch 1, checkpoint after step 3); its loss turns NaN at
        # global step 11 (epoch 2 step 3/8): the run stops. Rerun, it raises before step 13, after the
        # checkpoint of epoch 2 step 3
        "b": fit_cmd(digits_shards, root / "b", "--set", "fault.rank=1", "--set", "fault.kill_at_step=6",
                     "--set", "fault.nan_at_step=11", "--set", "fault.raise_at_step=13"),
        # NaN at step 5 on rank 0 only, skipped by both ranks
        "d": torchrun_cmd(digits_shards, root / "d", "--set", "fault.nan_at_step=5", "--set",
                          "train.skip_nonfinite=true"),
    }

    def stop_then_resume() -> dict[str, str]:
        return {"b1": fit(cmds["b"], root / "b1.log", ray_cluster, expect=3),
                "b2": fit(cmds["b"], root / "b2.log", ray_cluster)}

    with ThreadPoolExecutor(max_workers=3) as pool:   # each thread waits on its own command(s)
        b = pool.submit(stop_then_resume)
        others = {k: pool.submit(fit, cmds[k], root / f"{k}.log", None) for k in "ad"}
        logs = {**{k: f.result() for k, f in others.items()}, **b.result()}
        e_logs, survivors = kill_cluster_then_rerun(fit_cmd(digits_shards, root / "e"), root / "e", root)
    return {"root": root, "logs": {**logs, **e_logs}, "e_survivors": survivors}


def test_ddp_keeps_both_ranks_parameters_identical(runs):
    """Run A's two ranks, each saving its own model at every epoch's end (run.save_rank_states)."""
    a = runs["root"] / "a"
    rank0 = torch.load(a / "rank_states" / "rank0.pt", weights_only=True)
    rank1 = torch.load(a / "rank_states" / "rank1.pt", weights_only=True)
    last = weights(a)
    assert set(rank0) == set(rank1) == set(last)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key        # the two ranks saw different images
        assert torch.equal(rank0[key], last[key]), key


def test_killed_and_raising_workers_are_restarted_and_the_run_matches_an_uninterrupted_one(runs):
    first, rerun, root = runs["logs"]["b1"], runs["logs"]["b2"], runs["root"]
    assert "[fault] rank 1: SIGKILL before global step 6" in first
    assert "at epoch 1/2 step 4/8" in first                   # restarted from the checkpoint after step 3
    assert "injected fault: rank 1 raised before global step 13" in rerun
    assert "at epoch 2/2 step 4/8" in rerun                   # from the checkpoint after epoch 2 step 3
    assert sorted(p.name for p in (root / "b" / "faults").iterdir()) == \
        ["kill_at_step_6", "nan_at_step_11", "raise_at_step_13"]
    # of the six checkpoints taken, Ray Train's CheckpointConfig keeps the newest two it knows of (one written just
    # before a kill can be unknown to its controller, and stays)
    assert len([p for p in (root / "b" / "ray").glob("checkpoint_*") if p.is_dir()]) in (1, 2, 3)
    assert_same_run(root / "b", root / "a")


def test_nan_loss_stops_naming_the_step_keeps_the_last_good_checkpoint_and_resumes(runs):
    first, root = runs["logs"]["b1"], runs["root"]
    stop = [line for line in first.splitlines() if line.startswith("error:")]
    assert len(stop) == 1 and stop[0].startswith(
        "error: non-finite loss or gradients at epoch 2 step 3/8 (global step 11)"), first[-3000:]
    assert "the last good checkpoint (epoch 1) is kept" in stop[0]
    assert first.count("non-finite loss or gradients at") <= 3          # no retries: stopped, not failed
    assert first.count("resumed from") == 1                            # the kill's restart only
    # the rerun continues from epoch 2's start and, the faults having fired, ends exactly like run A
    assert rerun_start(runs["logs"]["b2"]).split(" at ")[-1].strip() == "epoch 2/2"
    assert_same_run(root / "b", root / "a")


def rerun_start(log: str) -> str:
    """The first "resumed from" line of a log."""
    return next(line for line in log.splitlines() if "resumed from" in line)


def test_skip_nonfinite_skips_the_step_and_finishes(runs):
    log, root = runs["logs"]["d"], runs["root"]
    assert "[trainer] skipped epoch 1 step 5/8 (global step 5): non-finite loss or gradients" in log
    history = read_metrics(root / "d")
    assert [r["epoch"] for r in history] == [0, 1]
    assert [r["skipped_steps"] for r in history] == [1, 0]
    assert all(torch.isfinite(w).all() for w in weights(root / "d").values())


def test_whole_cluster_killed_then_the_same_command_resumes_from_the_storage_path(runs):
    root = runs["root"]
    print("Ray processes that outlived the killed driver by 5 s (then killed):", runs["e_survivors"])
    assert f"[fault] rank 0: hangs before global step {HANG_AT}" in runs["logs"]["e1"]
    assert "resumed from" in runs["logs"]["e2"] and "resumed from" not in runs["logs"]["e1"]
    assert_same_run(root / "e", root / "a")
