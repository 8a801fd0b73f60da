"""An elastic group on a real multi-node Ray cluster on this machine: it shrinks when a spot node goes, grows when
one comes back, checkpoints on a preemption notice and loses no step to the reclaim, and its optimizer sees every
training sample exactly once per epoch throughout.

One scenario in one module-scoped fixture (the suite's time budget), driven by bench/reclaim.py's helpers: a Ray
cluster of a head without CPUs (the driver, Ray Train's controller) and two nodes of one logical CPU each, so each
worker of ``fit --workers 1-2`` runs on its own node; 640 training samples, 20 steps of 32 an epoch. Mid-run:

1. one node is drained for preemption with a 12 s deadline (cluster/spot_watch.py -> ``ray drain-node --reason
   DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 12``, what a spot reclaim does through KubeRay or the
   autoscaler): every rank reads the notice at its next check point, the group checkpoints at once, trains on,
   checkpoints again just before the deadline and stops stepping; then the node is killed (SIGKILL of all its
   processes), as the cloud does;
2. the group restarts with the one worker that fits, from that last checkpoint, and checkpoints after its
   first step (a group that changed size always does);
3. a new node joins: the group grows back to two workers;
4. a worker process of the grown group gets SIGTERM (a pod deletion, a VM's shutdown): a checkpoint, and
   training goes on;
5. a few steps later that worker's node is killed without any notice: the group of one restarts from that
   checkpoint and trains those steps again.

Every rank records the sample keys of each step it trains (``fault.record_keys``): which steps were trained
twice, and that each epoch, whatever was rolled back, gave the optimizer every sample exactly once.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import time

import pytest

from bench.reclaim import (drain, epoch_keys, groups, log_lines, lost_steps, sample_keys, small_train_set,
                           start_cluster, start_fit, stop, wait_for)
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow
DEADLINE_S = 12
RESTART_S = 240   # a group's restart: about 40 s here, over 100 s on two cores loaded twice over


@pytest.fixture(scope="module")
def elastic_run(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    train = small_train_set(digits_shards.raw / "train", root / "data")
    run, log = root / "run", root / "fit.log"
    cluster = start_cluster(2)
    events, started = {}, time.monotonic()

    def mark(name):
        events[name] = round(time.monotonic() - started, 1)

    proc = start_fit(cluster, train, digits_shards.val, run, log, 40)
    try:
        # into the second epoch: the group has timed an epoch's end, which the last checkpoint before the deadline
        # allows for (in a group's first epoch it would be taken at that epoch's last check point, unmeasured)
        first = wait_for("two workers in the second epoch",
                         lambda: [g for g in groups(run) if g["world"] == 2 and any(e >= 1 for e, _ in g["steps"])],
                         proc, log, 240)[0]
        mark("drain")
        drain(cluster, cluster.nodes[1], DEADLINE_S)
        # once the group's last checkpoint is written (the line after the save: on a loaded machine the save
        # takes seconds), the cloud takes the node
        wait_for("the last checkpoint before the deadline",
                 lambda: any("no more steps until" in x for x in log_lines(run)), proc, log, DEADLINE_S + 30)
        cluster.kill_node(cluster.nodes[1])                        # the cloud takes the node
        mark("killed")
        # two steps: a resized group checkpoints after its first, so that growing back restarts from it
        one = wait_for("the group of one", lambda: [g for g in groups(run) if g["world"] == 1
                                                    and len(g["steps"]) >= 2], proc, log, RESTART_S)[0]
        mark("shrunk")
        added = cluster.add_node()
        two = wait_for("the group of two again", lambda: [g for g in groups(run) if g["id"] > one["id"] and
                                                          g["world"] == 2 and len(g["steps"]) >= 2],
                       proc, log, RESTART_S)[0]
        mark("grown")
        # early in an epoch, so that the SIGTERM's checkpoint is still the newest when the node goes
        wait_for("an epoch's early steps", lambda: 1 <= max(groups(run)[-1]["steps"])[1] <= 5, proc, log, 60, 0.02)
        pid = cluster.worker_pids(added)[0]
        os.kill(pid, signal.SIGTERM)                                # a pod deletion / VM shutdown, not via Ray
        notice = wait_for("the SIGTERM notice", lambda: [x for x in log_lines(run) if "SIGTERM on 1 rank(s)" in x],
                          proc, log, 60, 0.02)[0]
        at = notice_step(notice)
        wait_for("a step after it", lambda: at_least(groups(run)[-1]["steps"], at, 1), proc, log, 60, 0.02)
        os.kill(pid, signal.SIGSTOP)   # the group steps no further (these tiny steps would reach the epoch's end)
        cluster.kill_node(added)                                   # no notice this time
        with contextlib.suppress(ProcessLookupError):   # stopped, it would outlive its node's raylet, which no
            os.kill(pid, signal.SIGKILL)                 # process of a lost VM does
        mark("killed unannounced")
        last = wait_for("the group of one again", lambda: [g for g in groups(run) if g["id"] > two["id"] and
                                                           g["steps"]], proc, log, RESTART_S)[0]
        mark("shrunk again")
        epoch = max(e for e, _ in groups(run)[-1]["steps"])
        wait_for("that group's epoch end", lambda: len(read_metrics(run)) > epoch, proc, log, RESTART_S)
        mark("done")
    finally:
        stop(proc)
        cluster.shutdown()
    print("elastic scenario, seconds since the fit started:", events)
    return {"run": run, "train": train, "log": log.read_text(), "sigterm_at": at,
            "ids": (first["id"], one["id"], two["id"], last["id"])}


def notice_step(line: str) -> tuple[int, int]:
    """(epoch, step), 0-based, of a ``preemption notice at epoch E step S/N`` line."""
    epoch, step = re.search(r"at epoch (\d+) step (\d+)/", line).groups()
    return int(epoch) - 1, int(step) - 1


def at_least(steps: dict, after: tuple[int, int], n: int) -> bool:
    return sum(1 for s in steps if s > after) >= n


def test_start_line_says_elastic_and_rays_watcher_lines_and_controller_tracebacks_stay_off_the_console(elastic_run):
    assert "elastic 1-2 worker(s) x 1 CPU" in elastic_run["log"]
    assert "PreemptionWatcher" not in elastic_run["log"]
    # the controller's tracebacks of a group start that timed out and of a lost worker stay in Ray's logs
    controller = [x for x in elastic_run["log"].splitlines() if x.startswith("(TrainController")]
    assert not any("Traceback" in x or "Graceful shutdown of backend failed" in x for x in controller), controller


def test_group_shrinks_to_one_on_the_reclaim_and_grows_back_to_two(elastic_run):
    sizes = [g["world"] for g in groups(elastic_run["run"])]
    assert sizes == [2, 1, 2, 1], sizes
    resizes = [r for line in read_metrics(elastic_run["run"]) for r in line.get("resizes", [])]
    assert [(r["from"], r["to"]) for r in resizes] == [(2, 1), (1, 2), (2, 1)], resizes


def test_the_notice_gives_a_checkpoint_and_no_step_is_lost_to_the_reclaim(elastic_run):
    lines = log_lines(elastic_run["run"])
    notice = [x for x in lines if "preemption notice" in x]
    assert notice and "checkpoint now" in notice[0] and "go in" in notice[0], lines[-40:]
    assert any("last checkpoint" in x for x in lines)
    # the reclaim is never reported as a failure: either the node's death is named as a reclaim, or (the last
    # checkpoint having landed just before the deadline on a loaded machine) Ray Train restarted the group at
    # the deadline before the node went, with nothing to report
    reclaim = lines[:next(i for i, x in enumerate(lines) if "the group changed from 2 to 1" in x)]
    assert not any(" failed: " in x for x in reclaim), reclaim[-20:]
    assert all("run.max_preemption_failures=-1" in x for x in reclaim if "lost with its reclaimed node" in x)
    reclaimed, after = groups(elastic_run["run"])[0], groups(elastic_run["run"])[1:]
    assert lost_steps(reclaimed, after) == []                      # the group of one repeats no step of the two
    assert min(after[0]["steps"]) == next_step(max(reclaimed["steps"]), steps=20)   # it starts right after


def next_step(at: tuple[int, int], steps: int) -> tuple[int, int]:
    epoch, step = at
    return (epoch, step + 1) if step + 1 < steps else (epoch + 1, 0)


def test_sigterm_to_a_worker_gives_a_checkpoint_and_an_unannounced_loss_resumes_from_it(elastic_run):
    lines = log_lines(elastic_run["run"])
    sigterm = [i for i, x in enumerate(lines) if "SIGTERM on 1 rank(s)" in x]
    assert sigterm and "checkpoint now, training goes on" in lines[sigterm[0]]
    assert any(re.match(r"\[trainer\] epoch \d+/40 step \d+/20 ", x) for x in lines[sigterm[0] + 1:])   # steps after it
    # the unannounced loss is a failure (max_failures), not a reclaim
    assert any(x.startswith("[trainer] rank ") and " failed: " in x for x in lines[sigterm[0]:])
    grown, last = groups(elastic_run["run"])[2:]
    assert min(last["steps"]) == next_step(elastic_run["sigterm_at"], steps=20)   # from the SIGTERM's checkpoint
    assert len(lost_steps(grown, [last])) >= 1                      # what the grown group did after it: again


def test_each_epoch_trains_on_every_sample_exactly_once(elastic_run):
    everything = sample_keys(elastic_run["train"])
    assert len(everything) == 640
    finished = {r["epoch"] for r in read_metrics(elastic_run["run"])}
    per_epoch = epoch_keys(groups(elastic_run["run"]))
    assert len(finished) >= 3
    for epoch in sorted(finished):
        assert sorted(per_epoch[epoch]) == everything, epoch     # no repeat, no gap, whatever the group's size
