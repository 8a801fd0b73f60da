"""`--workers MIN-MAX` and the preemption hook's rules, in this process (no cluster: the multi-node scenario on a
real Ray cluster is tests/test_elastic.py).

The hook is driven by its two real inputs: a notice of Ray's own type (``ray.train.PreemptionInfo``, what
``ray.train.get_preemption_info()`` returns) and a real SIGTERM to this process.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch
from ray.train import PreemptionInfo

from trainer import preemption
from trainer.cli import fit_flags, parser
from trainer.config import build_config
from trainer.fit import elastic_reason, num_workers
from trainer.loop import Step
from trainer.preemption import PreemptionCheck, deferring_sigterm, install_sigterm_flag

STEPS = 100


def config(*argv: str, sets=()):
    args = parser().parse_args(["fit", "--train", "t", "--val", "v", "--out", "o", *argv])
    return build_config(None, None, fit_flags(args), list(sets), need_data=False)


def test_workers_min_max_is_an_elastic_group_and_n_stays_fixed(tmp_path):
    cfg = config("--workers", "1-4", "--batch-size", "64")
    assert (cfg.run.min_workers, cfg.run.max_workers, cfg.run.workers) == (1, 4, 4)
    assert num_workers(cfg) == (1, 4)
    (tmp_path / "c.yaml").write_text("run: {min_workers: 1, max_workers: 4}\n")
    fixed = config("--config", str(tmp_path / "c.yaml"), "--workers", "3", "--batch-size", "63")
    assert (fixed.run.min_workers, fixed.run.max_workers, num_workers(fixed)) == (0, 0, 3)   # the flag wins
    assert config("--workers", "auto").run.max_workers == 0
    assert elastic_reason("as set: 1 CPU worker", 1, 4, 0.0) == "as set: elastic 1-4 CPU workers"
    assert elastic_reason("4 GPUs found: 1 worker x 1 GPU, 3 GPUs left idle", 2, 8, 1.0) == \
        "4 GPUs found: elastic 2-8 workers x 1 GPU"


@pytest.mark.parametrize("argv, sets, message", [
    (["--workers", "3-2"], [], "run.min_workers must be <= 2 (run.max_workers)"),
    (["--workers", "2-4", "--batch-size", "30"], [], "must divide evenly by run.max_workers (4)"),
    ([], ["run.min_workers=1", "run.max_workers=2", "run.workers=3"],
     "run.workers (3) must be auto or run.max_workers (2) in an elastic group"),
    ([], ["run.preemption_check_every=-1"], "run.preemption_check_every must be an integer >= 0 (0 = off), got -1"),
    ([], ["run.max_preemption_failures=-2"], "run.max_preemption_failures must be an integer >= -1"),
    ([], ["run.preemption_grace_s=5000"], "run.preemption_grace_s must be in [0, 3600], got 5000"),
    ([], ["run.resize_check_s=0"], "run.resize_check_s must be in (0, 86400], got 0"),
])
def test_bad_elastic_and_preemption_settings_are_one_line_naming_the_key(argv, sets, message):
    with pytest.raises(ValueError) as error:
        config(*argv, sets=sets)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_workers_flag_refuses_a_malformed_range(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["fit", "--train", "t", "--val", "v", "--out", "o", "--workers", "two-4"])
    assert e.value.code == 2
    assert "expected N, MIN-MAX (e.g. 2-4) or auto, got 'two-4'" in capsys.readouterr().err


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Paused(Exception):
    """Stands for the hook's wait for Ray Train to end the group (it never returns in a worker)."""


def run_steps(hook: PreemptionCheck, clock: Clock, steps: range, seconds_per_step: float = 1.0) -> None:
    for s in steps:
        clock.now += seconds_per_step
        hook.after_step(Step(0, s, STEPS), torch.zeros(()), 32, None)


def hook_with(notices: dict, every: int = 2):
    """A hook whose notice appears from global step ``notices['from']`` on, with ``notices['deadline']``."""
    clock, saved, calls = Clock(), [], []

    def notice():
        calls.append(clock.now)
        if len(calls) * every >= notices.get("from", 10**9):
            return PreemptionInfo(deadline_ms=int(notices["deadline"] * 1000) if notices.get("deadline") else None,
                                  preempted_node_to_ranks={"ab" * 28: [1]})
        return None

    def pause():
        raise Paused

    hook = PreemptionCheck(every, saved.append, notice, torch.device("cpu"), log=lambda line: None,
                           clock=clock, pause=pause)
    return hook, clock, saved, calls


def test_notice_checkpoints_at_once_then_again_just_before_the_deadline_then_stops_stepping():
    # steps take 1 s, checks every 2 steps; the notice is seen at global step 10, the node goes at t=1040
    hook, clock, saved, calls = hook_with({"from": 10, "deadline": 1040.0})
    with pytest.raises(Paused):
        run_steps(hook, clock, range(0, 60))
    assert len(calls) == (clock.now - 1000) // 2                        # a barrier every 2nd step, no more
    first, last = saved
    assert first.global_step == 10                                     # at once
    assert last.global_step > first.global_step
    margin = hook.margin_s(Step(0, 40, STEPS))                       # mid-epoch: the wait is a check interval
    assert 1040.0 - margin - 2.0 <= clock.now <= 1040.0 - margin + 2.0   # as late as the margin allows
    assert clock.now < 1040.0                                          # before the node goes


def run_epochs(hook: PreemptionCheck, clock: Clock, epochs: int, steps: int, epoch_end_s: float) -> None:
    """Steps of 1 s; each epoch's end (evaluation, checkpoint) takes ``epoch_end_s``."""
    for epoch in range(epochs):
        for s in range(steps):
            clock.now += 1.0
            hook.after_step(Step(epoch, s, steps), torch.zeros(()), 32, None)
        clock.now += epoch_end_s


# Epochs of 20 steps of 1 s, checked every 2nd step (0-based steps 1, 3, ..., 17): epoch E's step S ends at
# 1000 + E * (20 + end) + S + 1, where ``end`` is the epoch end's duration (evaluation, checkpoint).
@pytest.mark.parametrize("notice_from, deadline, epoch_end_s, stops_at", [
    # an epoch end timed (24 s between check points): the deadline would pass during epoch 2's end, so the last
    # checkpoint is epoch 2's last check point (t=1058), not epoch 3's first (t=1082, after the deadline)
    (24, 1070.0, 20.0, (1, 17)),
    # no epoch end timed yet (a notice in a group's first epoch): the last check point before one is the last
    (6, 1030.0, 20.0, (0, 17)),
    # a deadline mid-epoch, further than the epoch end's margin from its last check point: stepping goes on into
    # the next epoch until two check intervals are left, as without epoch ends
    (24, 1062.0, 4.0, (2, 9)),
])
def test_the_deadline_never_passes_during_an_epoch_end(notice_from, deadline, epoch_end_s, stops_at):
    hook, clock, saved, _ = hook_with({"from": notice_from, "deadline": deadline})
    with pytest.raises(Paused):
        run_epochs(hook, clock, 5, 20, epoch_end_s)
    last = saved[-1]
    assert clock.now < deadline                                        # the last checkpoint is taken before it
    assert (last.epoch, last.step) == stops_at, (last, clock.now)


def test_a_notice_without_deadline_checkpoints_once_and_training_goes_on():
    hook, clock, saved, _ = hook_with({"from": 6})
    run_steps(hook, clock, range(0, 60))
    assert [at.global_step for at in saved] == [6]


def test_no_notice_no_checkpoint_and_checks_only_every_n_steps():
    hook, clock, saved, calls = hook_with({}, every=5)
    run_steps(hook, clock, range(0, 60))
    assert saved == [] and len(calls) == 12


def test_sigterm_while_training_becomes_a_notice_and_otherwise_does_what_it_did():
    before = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: before.append(signum))
    try:
        assert install_sigterm_flag()
        hook, clock, saved, _ = hook_with({})
        with deferring_sigterm():
            run_steps(hook, clock, range(0, 4))
            os.kill(os.getpid(), signal.SIGTERM)                       # a real signal to this process
            run_steps(hook, clock, range(4, 10))
        assert [at.global_step for at in saved] == [6] and before == []  # the next check point after it
        os.kill(os.getpid(), signal.SIGTERM)                           # outside training: the previous handler
        assert before == [signal.SIGTERM]
        assert preemption.install_sigterm_flag()                       # installing twice keeps the original
        assert preemption._previous is not preemption._on_sigterm
    finally:
        signal.signal(signal.SIGTERM, original)
