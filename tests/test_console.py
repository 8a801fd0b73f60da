"""Defaults and console of `python -m trainer fit`: "auto" workers and GPUs decided from the cluster's resources,
rank 0's lines followed from RUN_DIR/train.log, and a real run whose output is the project's lines only."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import build_config
from trainer.console import Follow, RunLog, duration, summary
from trainer.ray_cluster import batch_split_error, decide_workers

ROOT = Path(__file__).resolve().parents[1]


# ---- the decision ------------------------------------------------------------------------------

@pytest.mark.parametrize("workers, gpus, resources, parallel, want", [
    ("auto", "auto", {"CPU": 2.0}, "data", (1, 0.0, "no GPU found: 1 CPU worker")),
    ("auto", "auto", {"CPU": 64.0, "GPU": 4.0}, "data", (4, 1.0, "4 GPUs found: 4 workers x 1 GPU")),
    ("auto", "auto", {"GPU": 3.0}, "model", (1, 2.0, "3 GPUs found: 1 worker x 2 GPUs, 1 GPU left idle")),
    ("auto", "auto", {"GPU": 1.0}, "model",
     (1, 0.0, "1 GPU found (--parallel model needs 2 per worker): 1 CPU worker")),
    # explicit values win, whatever the cluster has
    (2, 0, {"GPU": 8.0}, "data", (2, 0.0, "as set: 2 CPU workers")),
    (3, 1, {"GPU": 8.0}, "data", (3, 1.0, "as set: 3 workers x 1 GPU")),
    # one explicit, the other decided
    (2, "auto", {"GPU": 8.0}, "data", (2, 1.0, "8 GPUs found: 2 workers x 1 GPU, 6 GPUs left idle")),
    (2, "auto", {"GPU": 1.0}, "data", (2, 0.0, "1 GPU found (2 workers need 2): 2 CPU workers")),
    ("auto", 2, {"GPU": 8.0}, "data", (4, 2.0, "8 GPUs found: 4 workers x 2 GPUs")),
    # local mode stays local mode; its GPU is this machine's
    (0, "auto", {"GPU": 2.0}, "data", (0, 1.0, "2 GPUs found: local mode x 1 GPU")),
    (0, "auto", {}, "data", (0, 0.0, "no GPU found: local mode on the CPU")),
])
def test_decide_workers(workers, gpus, resources, parallel, want):
    assert decide_workers(workers, gpus, resources, parallel=parallel) == want


def test_a_batch_that_does_not_split_names_both_fixes():
    message = batch_split_error(256, 3, "3 GPUs found: 3 workers x 1 GPU")
    assert message == ("train.batch_size (256) is the global batch and must divide evenly by the 3 workers "
                       "(3 GPUs found: 3 workers x 1 GPU); pass --batch-size 255 or --workers 2")


def test_auto_is_the_default_and_explicit_values_from_a_file_are_kept(tmp_path):
    cfg = build_config(need_data=False)
    assert (cfg.run.workers, cfg.run.gpus_per_worker) == ("auto", "auto")
    f = tmp_path / "run.yaml"
    f.write_text("run: {workers: 2, gpus_per_worker: 0}\n")
    cfg = build_config(config_file=str(f), need_data=False)
    assert (cfg.run.workers, cfg.run.gpus_per_worker) == (2, 0.0)
    assert build_config(config_file=str(f), flags={"run.workers": "auto"}, need_data=False).run.workers == "auto"
    with pytest.raises(ValueError, match=r"^run\.workers must be an integer or 'auto', got 'many'$"):
        build_config(sets=["run.workers=many"], need_data=False)


# ---- the console --------------------------------------------------------------------------------

def test_follow_prints_only_new_lines_and_a_bar_replaces_step_lines(tmp_path, monkeypatch):
    log = RunLog(tmp_path)
    log("[trainer] from an earlier command")
    for bar, want in ((False, ["[trainer] epoch 1/2 step 5/10 loss 2.0 lr 0.1 10.0 images/s ETA 3s",
                               "[trainer] epoch 1/2 train_loss 2.0 val top-1 50.00 %"]),
                      (True, ["[trainer] epoch 1/2 train_loss 2.0 val top-1 50.00 %"])):
        out = io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)
        with Follow(tmp_path, bar=bar, poll_s=0.01):
            log.tick({"epoch": 0, "epochs": 2, "step": 5, "steps": 10, "loss": 2.0, "images_per_s": 10.0,
                      "eta_s": 3.0}, force=True)
            log("[trainer] epoch 1/2 step 5/10 loss 2.0 lr 0.1 10.0 images/s ETA 3s")
            log("[trainer] epoch 1/2 train_loss 2.0 val top-1 50.00 %")
        monkeypatch.undo()
        lines = [re.sub(r".*\r", "", line) for line in out.getvalue().splitlines()]   # a bar redraws with \r
        assert [line for line in lines if line.startswith("[trainer]")] == want
        assert ("epoch 1/2:" in out.getvalue()) == bar          # tqdm's "epoch 1/2:  50%|...", on a terminal only
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 5


def test_duration():
    assert [duration(s) for s in (4.4, 65, 7500)] == ["4s", "1m05s", "2h05m"]


def test_summary_names_the_best_epoch_and_the_files(tmp_path):
    records = [{"epoch": 0, "val_top1": 0.5, "val_top5": 0.9, "images_per_s": 100.0},
               {"epoch": 1, "val_top1": 0.7, "val_top5": 0.95, "images_per_s": 120.0},
               {"epoch": 2, "val_top1": 0.6, "val_top5": 0.97, "images_per_s": 110.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "best.pt").write_bytes(b"x")
    lines = summary(tmp_path, 75.0, "/tmp/ray/session_x/logs")
    assert lines[0] == ("[trainer] done in 1m15s: 3 epochs, best epoch 2: val top-1 70.00 %, top-5 95.00 %; "
                        "training 110.0 images/s (mean over epochs)")
    assert lines[1] == f"[trainer] files in {tmp_path}: best.pt, metrics.jsonl"
    assert lines[2] == "[trainer] Ray's logs: /tmp/ray/session_x/logs (--verbose shows them here)"


# ---- Ray's lines kept off the console ------------------------------------------------------------

# The cleaner's warning in Ray 2.60, and in the wording Ray's main branch gives it (the controller's id added)
CLEANER_WARNINGS = ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
                    "Continuing to monitor.",
                    "Failed to query Ray Train Controller actor 4a8f state. State API may be temporarily unavailable. "
                    "Continuing to monitor other controllers."]


def test_dropped_lines_are_only_those_naming_a_marker():
    from trainer.ray_cluster import CLEANER_LINES, WATCHER_LINES, ConsoleFilter

    batch = {"ip": "192.0.2.2", "pid": "31291", "job": "01000000", "is_err": True,
             "actor_name": "PlacementGroupCleaner", "task_name": "", "lines": CLEANER_WARNINGS}
    assert ConsoleFilter(WATCHER_LINES + CLEANER_LINES)(batch) is None
    assert ConsoleFilter(WATCHER_LINES)(batch) == batch                       # a cluster with a dashboard
    worker = {**batch, "actor_name": "RayTrainWorker", "lines": ["Traceback (most recent call last):",
                                                                 CLEANER_WARNINGS[0], "ValueError: bad shard"]}
    assert ConsoleFilter(CLEANER_LINES)(worker) == {**worker, "lines": ["Traceback (most recent call last):",
                                                                     "ValueError: bad shard"]}


# The controller's lines when an elastic group's start at 2 workers times out, then when a worker is lost (Ray 2.60)
STARTUP_TIMEOUT = ["Error in control loop iteration: The worker group startup timed out after 8.0 seconds waiting for "
                   "2 workers. Potential causes include: (1) temporary insufficient cluster resources",
                   "Traceback (most recent call last):",
                   '  File "ray/train/v2/_internal/execution/controller/controller.py", line 914, in '
                   "_run_control_loop_iteration",
                   "    result = await self._step()",
                   "             ^^^^^^^^^^^^^^^^^^",
                   "ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError: The worker group startup timed "
                   "out after 8.0 seconds waiting for 2 workers."]
SHUTDOWN = ["Graceful shutdown of backend failed. This is expected if one of the workers has crashed.",
            "Traceback (most recent call last):",
            '  File "ray/train/torch/config.py", line 333, in on_shutdown',
            "    ray.get(futures, timeout=timeout_s)",
            "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
            "\tclass_name: ",
            "\tactor_id: d7ef30ba7a6b809e15fc320101000000",
            ""]


def test_the_controllers_expected_tracebacks_stay_off_the_console_and_other_lines_stay_on():
    from trainer.ray_cluster import TRACEBACK_AFTER, WATCHER_LINES, WITH_TRACEBACK, ConsoleFilter

    console = ConsoleFilter(WATCHER_LINES, TRACEBACK_AFTER, WITH_TRACEBACK)
    controller = {"ip": "192.0.2.2", "pid": "813", "actor_name": "TrainController"}
    worker = {"ip": "192.0.2.2", "pid": "1437", "actor_name": "RayTrainWorker"}
    other_error = ["Error in control loop iteration: something else", "Traceback (most recent call last):",
                   "ValueError: kept"]
    assert console({**controller, "lines": STARTUP_TIMEOUT + other_error}) == {
        **controller, "lines": STARTUP_TIMEOUT[:1] + other_error}        # the message stays, its traceback goes
    # a traceback split over two batches, another process's lines in between: each process's own state
    assert console({**controller, "lines": SHUTDOWN[:3]}) is None
    assert console({**worker, "lines": ["Traceback (most recent call last):", "  File x", "RuntimeError: gloo"]}) == {
        **worker, "lines": ["Traceback (most recent call last):", "  File x", "RuntimeError: gloo"]}
    assert console({**controller, "lines": SHUTDOWN[3:] + ["Worker group started."]}) == {
        **controller, "lines": ["Worker group started."]}
    assert console({**controller, "lines": ["  an indented line"]}) == {**controller, "lines": ["  an indented line"]}


def test_the_cleaners_warning_without_a_state_api_is_dropped_and_fit_says_why_once(ray_cluster):
    """Ray Train's own placement-group cleaner, its State API unreachable as on a cluster without a dashboard (an
    address where nothing listens, whatever other Ray instances this machine runs), writes its warning at every
    try; the lines Ray's log forwarding would hand the console are all dropped. The session's cluster runs
    without a dashboard, so fit's notice is due."""
    import socket
    import time

    import ray
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner

    from trainer.ray_cluster import CLEANER_LINES, ConsoleFilter, dashboard_notice, ray_log_dir

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed again on leaving: nothing answers there
    cleaner = ray.remote(num_cpus=0)(PlacementGroupCleaner).options(
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}).remote(
        controller_actor_id="ff" * 16, check_interval_s=0.1, get_actor_timeout_s=1, stop_timeout=1)
    try:
        pid = ray.get(cleaner.__ray_call__.remote(lambda self: os.getpid()))
        ray.get(cleaner.start_monitoring.remote())
        lines, deadline = [], time.monotonic() + 30
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            lines = [line for f in Path(ray_log_dir()).glob(f"worker-*-{pid}.err")
                     for line in f.read_text().splitlines() if "Failed to query Ray Train Controller" in line]
    finally:
        ray.kill(cleaner)
    assert len(lines) >= 2, f"no warnings from the cleaner (pid {pid}) in {ray_log_dir()}"
    batch = {"pid": str(pid), "actor_name": "PlacementGroupCleaner", "lines": lines}
    assert ConsoleFilter(CLEANER_LINES)(batch) is None
    notice = dashboard_notice()
    assert notice.startswith("[trainer] this Ray cluster runs without its dashboard: no dashboard, so no "
                             "placement-group cleaner (") and "\n" not in notice
    assert notice.endswith('Fix: start its head with "ray[default]" installed and '
                           "`ray start --head --include-dashboard=true`")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # Ray Data's own, on building a TorchTrainer
def test_the_trainer_leaves_out_ray_trains_helper_actors_it_has_no_use_for(ray_cluster):
    """Ray Train's real default callbacks: the dataset manager's always goes (no datasets are handed to Ray Train),
    the placement-group cleaner's only where no State API is (the session's cluster has no dashboard). Both names
    must be among Ray's defaults: a Ray version that renames them fails here instead of quietly keeping them."""
    from ray.train.torch import TorchTrainer

    from trainer.ray_cluster import (UNUSED_CALLBACKS, UNUSED_WITHOUT_STATE_API, lean_callbacks,
                                     lean_torch_trainer)

    def names(trainer) -> list[str]:
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    ray_own = names(TorchTrainer(lambda: None))
    assert set(UNUSED_CALLBACKS + UNUSED_WITHOUT_STATE_API) <= set(ray_own), ray_own
    assert names(lean_torch_trainer(lambda: None)) == [n for n in ray_own if n not in
                                                        UNUSED_CALLBACKS + UNUSED_WITHOUT_STATE_API]
    with_state_api = [type(c).__name__ for c in lean_callbacks(TorchTrainer(lambda: None)._create_default_callbacks(),
                                                               state_api=True)]
    assert with_state_api == [n for n in ray_own if n not in UNUSED_CALLBACKS]


# ---- a real run ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_default_run_decides_from_the_cluster_and_prints_only_its_own_lines(digits_shards, ray_cluster, tmp_path):
    """No --workers / --gpus-per-worker: the CPU-only cluster at RAY_ADDRESS gets 1 CPU worker. Stdout is a
    file, so every line is the project's own: no Ray prefixes, colour codes or Ray Train INFO lines."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "fit", "--train", str(digits_shards.train), "--val",
           str(digits_shards.val), "--out", str(run), "--epochs", "1", "--batch-size", "32", "--width", "0.125",
           "--set", "data.image_size=64", "--set", "data.num_threads=1", "--set", "train.max_steps_per_epoch=4",
           "--set", "train.log_every=2"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()
    # the session's cluster runs without a dashboard: one line says so, the cleaner's warnings stay in Ray's logs
    assert lines[0].startswith("[trainer] this Ray cluster runs without its dashboard: "), lines[0]
    assert "State API may be temporarily unavailable" not in out.stderr
    assert lines[1].startswith("[trainer] fit: no GPU found: 1 CPU worker; 1 worker(s) x 1 CPU, "), lines[1]
    assert all(line.startswith("[trainer] ") for line in lines), out.stdout
    assert "\x1b[" not in out.stdout + out.stderr
    assert re.search(r"^\[trainer\] epoch 1/1 step 2/4 loss \S+ lr \S+ \S+ images/s ETA \d+s$", out.stdout, re.M)
    assert re.search(r"^\[trainer\] done in \S+: 1 epochs, best epoch 1: val top-1 [\d.]+ %, top-5 [\d.]+ %; "
                     r"training [\d.]+ images/s", out.stdout, re.M)
    assert f"[trainer] files in {run}: best.pt, last.pt, metrics.jsonl, curves.png, tb, train.log" in lines
    assert [json.loads(line)["workers"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    saved = json.loads((run / "config.json").read_text())["config"]["run"]
    assert (saved["workers"], saved["gpus_per_worker"]) == (1, 0)                # what "auto" became
    assert (run / "train.log").read_text().splitlines() == lines[2:-3]            # rank 0's lines, kept
    # no dataset manager started (an actor's log names it on its first line; no fit in this session starts one)
    from trainer.ray_cluster import ray_log_dir

    assert not [f for f in Path(ray_log_dir()).glob("worker-*.out") if ":actor_name:DatasetManager" in f.read_text()]
