"""The plain-torch loop (trainer/loop.py) and its hooks on plain lists of tensors: no Ray, no DALI, no files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.hooks import NonFinitePolicy, NonFiniteStep
from trainer.config import Config
from trainer.loop import EpochProgress, Hook, Step, evaluate, train_epoch
from trainer.schedule import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


class PerStep:
    """A schedule stepped every step, counting its steps (the loop's contract: ``per_step`` and ``step()``)."""
    per_step = True

    def __init__(self):
        self.steps = 0

    def step(self, *_):
        self.steps += 1


def batches(n: int, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def model_and_optimizer(seed: int = 0):
    """A tiny model with the trainer's own optimizer (fused SGD, momentum 0.9, weight decay: the paper's)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    return model, make_optimizer(model, Config())


HOST_SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


@pytest.fixture
def host_syncs(monkeypatch):
    """Counts every Tensor method call that makes the host wait for the device."""
    count = {"n": 0}
    for name in HOST_SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count["n"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


class Recorder(Hook):
    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def before_step(self, at):
        self.calls.append(("before", at.step))

    def on_loss(self, loss, at):
        self.calls.append(("loss", at.step))
        return loss

    def accept_step(self, loss, grad_norm, at):
        self.calls.append(("accept", at.step))
        return None                                          # no say: the update is applied

    def after_step(self, at, loss, batch_size, progress):
        self.calls.append(("after", at.step))


class PoisonAt(Hook):
    """Makes the loss NaN at one global step (what the fault injector does)."""

    def __init__(self, global_step: int):
        self.global_step = global_step

    def on_loss(self, loss, at):
        return loss * float("nan") if at.global_step == self.global_step else loss


def test_an_epoch_calls_each_hook_in_order_and_counts_what_it_trained_on():
    model, opt = model_and_optimizer()
    rec, sched = Recorder(), PerStep()
    progress = train_epoch(model, batches(5), opt, sched, [rec], epoch=0, steps=3)
    assert rec.calls == [(name, s) for s in range(3) for name in ("before", "loss", "accept", "after")]
    assert int(progress.seen) == 12 and int(progress.skipped) == 0 and sched.steps == 3
    assert float(progress.loss_sum) > 0


def test_the_loop_equals_the_textbook_sgd_loop():
    data = batches(4)
    model, opt = model_and_optimizer()
    train_epoch(model, data, opt, PerStep(), epoch=0, steps=4)
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)   # not fused
    for x, y in data:
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(model.parameters(), ref.parameters()))


def test_a_resumed_epoch_continues_the_step_count_and_the_totals():
    model, opt = model_and_optimizer()
    rec = Recorder()
    start = EpochProgress.from_state({"loss_sum": 5.0, "seen": 8, "skipped": 1}, torch.device("cpu"))
    progress = train_epoch(model, batches(2), opt, PerStep(), [rec], epoch=1, steps=5, first_step=3, progress=start)
    assert [s for name, s in rec.calls if name == "before"] == [3, 4]
    assert int(progress.seen) == 16 and int(progress.skipped) == 1 and float(progress.loss_sum) > 5


def test_nonfinite_policy_skip_leaves_the_weights_and_counts_the_step():
    data = batches(2)
    model, opt = model_and_optimizer()
    sched, lines = PerStep(), []
    progress = train_epoch(model, data, opt, sched, [PoisonAt(1), NonFinitePolicy(skip=True, read_every=1, log=lines.append)],
                           epoch=0, steps=2)
    assert int(progress.skipped) == 1 and int(progress.seen) == 4
    assert sched.steps == 2                                  # a per-step schedule still moves on
    # the skipped first step left no trace, not even in the momentum buffers: as if only batch 2 was seen
    ref, ref_opt = model_and_optimizer()
    train_epoch(ref, data[1:], ref_opt, PerStep(), epoch=0, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert lines == ["[trainer] skipped epoch 1 step 1/2 (global step 1): non-finite loss or gradients "
                     "(train.skip_nonfinite)"]


class CountSyncs(Hook):
    """Records the host-sync count after each step."""

    def __init__(self, counter):
        self.counter, self.after = counter, []

    def after_step(self, at, loss, batch_size, progress):
        self.after.append(self.counter["n"])


@pytest.mark.parametrize("skip", [True, False])
def test_a_training_step_makes_no_host_sync_and_the_verdict_is_read_only_at_read_points(host_syncs, skip):
    model, opt = model_and_optimizer()
    count, lines = CountSyncs(host_syncs), []
    hooks = [PoisonAt(2), NonFinitePolicy(skip=skip, read_every=4, log=lines.append), count]
    host_syncs["n"] = 0
    if skip:
        train_epoch(model, batches(6), opt, PerStep(), hooks, epoch=0, steps=6)
        assert count.after[:3] == [0, 0, 0]                 # steps 1-3, the bad step 2 included: no sync
        assert count.after[3] > 0                           # step 4 is a read point: the skip is reported
        assert count.after[4] == count.after[3]             # step 5: none again
        assert lines == ["[trainer] skipped epoch 1 step 2/6 (global step 2): non-finite loss or gradients "
                         "(train.skip_nonfinite)"]
    else:
        with pytest.raises(NonFiniteStep) as stop:
            train_epoch(model, batches(6), opt, PerStep(), hooks, epoch=0, steps=6)
        assert count.after == [0, 0, 0]                     # noticed at the read after step 4, before its hooks
        assert str(stop.value.at) == "epoch 1 step 2/6 (global step 2)"


def test_nonfinite_policy_stop_raises_before_the_update_naming_the_step():
    model, opt = model_and_optimizer()
    with pytest.raises(NonFiniteStep) as stop:
        train_epoch(model, batches(3), opt, PerStep(), [PoisonAt(2), NonFinitePolicy(skip=False, read_every=1)], epoch=0, steps=3)
    after_one = [p.detach().clone() for p in model.parameters()]
    ref, ref_opt = model_and_optimizer()
    train_epoch(ref, batches(1), ref_opt, PerStep(), epoch=0, steps=1)    # only step 1 was applied
    assert all(torch.equal(a, b) for a, b in zip(after_one, ref.parameters()))
    assert stop.value.at == Step(0, 1, 3) and str(stop.value.at) == "epoch 1 step 2/3 (global step 2)"


def test_evaluate_counts_only_the_masked_rows():
    model = torch.nn.Linear(6, 3)
    x = torch.randn(4, 6)
    logits = model(x)
    labels = logits.argmax(1)
    labels[3] = (labels[3] + 1) % 3                              # one wrong answer, then masked out
    mask = torch.tensor([True, True, True, False])
    counts = evaluate(model, [(x, labels, mask)], torch.device("cpu"))
    assert counts["n"] == 3 and counts["top1"] == 3 and counts["top5"] == 3
    ten = evaluate(model, [(x.view(2, 2, 6), labels[:2], mask[:2])], torch.device("cpu"), ten_crop=True)
    assert ten["n"] == 2


def test_the_loop_and_the_trainer_never_import_ray():
    code = ("import sys, trainer.loop, trainer.hooks, trainer.train, trainer.checkpoint, trainer.parallelize; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
