"""The plain-torch loop (trainer/loop.py) and its hooks on plain lists of tensors: no Ray, no DALI, no files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.hooks import NonFinitePolicy, NonFiniteStep
from trainer.loop import EpochProgress, Hook, Step, evaluate, train_epoch

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
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


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
        return True

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
    assert progress.seen == 12 and progress.skipped == 0 and sched.steps == 3
    assert float(progress.loss_sum) > 0


def test_the_loop_equals_the_textbook_sgd_loop():
    data = batches(4)
    model, opt = model_and_optimizer()
    train_epoch(model, data, opt, PerStep(), epoch=0, steps=4)
    ref, ref_opt = model_and_optimizer()
    for x, y in data:
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_a_resumed_epoch_continues_the_step_count_and_the_totals():
    model, opt = model_and_optimizer()
    rec = Recorder()
    start = EpochProgress(torch.tensor(5.0, dtype=torch.float64), seen=8, skipped=1)
    progress = train_epoch(model, batches(2), opt, PerStep(), [rec], epoch=1, steps=5, first_step=3, progress=start)
    assert [s for name, s in rec.calls if name == "before"] == [3, 4]
    assert progress.seen == 16 and progress.skipped == 1 and float(progress.loss_sum) > 5


def test_nonfinite_policy_skip_leaves_the_weights_and_counts_the_step():
    model, opt = model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    sched, lines = PerStep(), []
    progress = train_epoch(model, batches(1), opt, sched, [PoisonAt(1), NonFinitePolicy(skip=True, log=lines.append)],
                           epoch=0, steps=1)
    assert progress.skipped == 1 and progress.seen == 0
    assert sched.steps == 1                                  # a per-step schedule still moves on
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert lines == ["[trainer] skipped epoch 1 step 1/1 (global step 1): non-finite loss or gradients "
                     "(train.skip_nonfinite)"]


def test_nonfinite_policy_stop_raises_before_the_update_naming_the_step():
    model, opt = model_and_optimizer()
    with pytest.raises(NonFiniteStep) as stop:
        train_epoch(model, batches(3), opt, PerStep(), [PoisonAt(2), NonFinitePolicy(skip=False)], epoch=0, steps=3)
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
