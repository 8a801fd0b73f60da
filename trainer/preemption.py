"""Preemption notices, read at step boundaries: a just-in-time checkpoint before a spot node goes.

Two sources, one path (docs/reliability.md, "A spot node is reclaimed"):

- **Ray's notice.** When a node that hosts workers is drained for preemption (a spot reclaim through the
  autoscaler or KubeRay, SIGTERM to ``ray start --block``, or ``ray drain-node --reason
  DRAIN_NODE_REASON_PREEMPTION``), Ray Train's preemption watcher tells every worker, and
  ``ray.train.get_preemption_info()`` returns the affected ranks and the deadline. It is a barrier across the
  workers, so it is called every ``run.preemption_check_every`` steps, not every step.
- **SIGTERM to a worker process** (``docker stop``, a VM's shutdown, a process manager): the handler installed by
  :class:`PreemptibleTorchConfig` in each worker's main thread only sets a flag; the check points all-reduce it,
  so every rank agrees and takes the same path in the same step.

On the first notice :class:`PreemptionCheck` saves a checkpoint at once (trainer/train.py ``save_mid_epoch``:
every rank's data position, so the restarted group, of any size, continues from that step) and training goes
on. With a deadline, it saves once more at the last check point that leaves ``margin`` seconds before it (twice
the measured save time plus twice the wait for the next check point, :meth:`PreemptionCheck.margin_s`), then
stops stepping: a step taken after that would only be
thrown away, because Ray Train restarts the group once the deadline has passed. So the restarted group repeats
no step. Without a deadline (a SIGTERM) it keeps training until the process goes.

The loop (trainer/loop.py) knows nothing of Ray: this hook is added by the Ray Train adapter (trainer/fit.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import torch

from trainer.distributed import all_reduce_sum
from trainer.loop import EpochProgress, Hook, Step

# Set by the SIGTERM handler of this process while it trains; read (and all-reduced) at the next check point.
SIGTERM_RECEIVED = threading.Event()
TRAINING = threading.Event()      # set by :func:`deferring_sigterm` around the training loop
_previous: Any = signal.SIG_DFL   # the handler this one replaced (Ray's worker: exit)


def _on_sigterm(signum, frame) -> None:
    if TRAINING.is_set():   # a platform's notice: checkpoint at the next check point, go on until killed
        SIGTERM_RECEIVED.set()
    elif callable(_previous):   # not training (Ray tearing the group down, or the run is over): as before
        _previous(signum, frame)
    else:
        signal.signal(signum, _previous)
        os.kill(os.getpid(), signum)


def install_sigterm_flag() -> bool:
    """While :data:`TRAINING` is set, SIGTERM sets :data:`SIGTERM_RECEIVED` instead of ending the process (Ray's
    worker default, which it does otherwise). Python handlers can be installed only from the main thread;
    returns whether it was installed."""
    global _previous
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    if previous is not _on_sigterm:
        _previous = previous
    return True


@contextlib.contextmanager
def deferring_sigterm():
    """Around the training loop: a SIGTERM meanwhile becomes a notice instead of an exit."""
    SIGTERM_RECEIVED.clear()
    TRAINING.set()
    try:
        yield
    finally:
        TRAINING.clear()


def preemptible_torch_config(backend: str):
    """A ``TorchConfig`` whose workers, once their process group is up, run :func:`install_sigterm_flag`
    in their main thread (Ray Train runs the training function in another thread of the actor)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            super().on_start(worker_group, backend_config)
            worker_group.execute(install_sigterm_flag)

    class PreemptibleTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _Backend

    return PreemptibleTorchConfig(backend=backend)


class PreemptionCheck(Hook):
    """Every ``every`` global steps: is a node of the group going (Ray's notice, or SIGTERM on any rank)?

    ``save(at)`` writes the checkpoint (all ranks call it together); ``notice()`` is
    ``ray.train.get_preemption_info`` (a barrier: every rank calls it at the same steps). ``clock`` and
    ``pause`` are for tests of the timing rule."""

    def __init__(self, every: int, save: Callable[[Step], None], notice: Callable[[], Any],
                 device: torch.device, log: Callable[[str], None] = print, *,
                 clock: Callable[[], float] = time.time, pause: Callable[[], None] | None = None):
        self.every, self.save, self.notice, self.device, self.log = every, save, notice, device, log
        self.clock, self.pause = clock, pause or _wait_for_the_end
        self.saved_at: Step | None = None      # the checkpoint taken on the notice
        self.final = False                     # the last one before the deadline is written
        self.save_s = 0.0                      # how long the notice's checkpoint took
        self.last_check: tuple[int, float] | None = None   # (epoch, time) of the previous check point
        self.interval_s = 0.0                  # between two check points of one epoch
        self.boundary_s: float | None = None   # the longest between an epoch's last and the next one's first

    def due(self, at: Step) -> bool:
        return bool(self.every) and at.global_step % self.every == 0 and at.step + 1 < at.steps

    def after_step(self, at: Step, loss: torch.Tensor, batch_size: int, progress: EpochProgress) -> None:
        if not self.due(at):
            return
        now = self.clock()
        if self.last_check is not None:
            epoch, then = self.last_check
            if epoch == at.epoch:
                self.interval_s = now - then
            else:   # an epoch's end lay between: its evaluation and checkpoint, often longer than many steps
                self.boundary_s = max(self.boundary_s or 0.0, now - then)
        self.last_check = (at.epoch, now)
        info = self.notice()
        deadline = info.deadline_ms / 1000 if info is not None and info.deadline_ms else None
        near = deadline is not None and deadline - now <= self.margin_s(at)
        # one collective: SIGTERM on any rank, and whether any rank's clock says the deadline is near
        sigterm, near_votes = all_reduce_sum([float(SIGTERM_RECEIVED.is_set()), float(near)], self.device)
        if info is None and not sigterm:
            return
        if self.saved_at is None:
            self.log(f"[trainer] preemption notice at {at}: " + describe(info, sigterm, now)
                     + ("; checkpoint now" if near_votes else "; checkpoint now, training goes on"))
            started = time.perf_counter()
            self.save(at)
            self.save_s, self.saved_at = time.perf_counter() - started, at
        elif near_votes and not self.final:
            self.log(f"[trainer] preemption deadline in {deadline - now:.1f} s at {at}: last checkpoint")
            self.save(at)
        if near_votes and not self.final:   # any later step would be trained again by the restarted group
            self.final = True
            self.log("[trainer] no more steps until Ray Train restarts the group after the deadline")
            self.pause()

    def margin_s(self, at: Step) -> float:
        """How long before the deadline the last checkpoint may start at check point ``at``: twice the save and
        twice the wait for the next check point. When that lies past the epoch's end, the wait is the longest
        epoch end timed so far, and unbounded while none is: the deadline must not pass during an evaluation."""
        wait = self.interval_s
        if at.step + self.every + 1 >= at.steps:   # the next check point is in the next epoch
            wait = self.boundary_s if self.boundary_s is not None else math.inf
        return 2 * self.save_s + 2 * wait


def describe(info: Any, sigterm: float, now: float) -> str:
    parts = []
    if info is not None:
        parts.append(f"node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} with rank(s) "
                     f"{info.preempted_ranks} "
                     + (f"go in {info.deadline_ms / 1000 - now:.1f} s" if info.deadline_ms else "go (no deadline)"))
    if sigterm:
        parts.append(f"SIGTERM on {int(sigterm)} rank(s)")
    return "; ".join(parts)


def _wait_for_the_end() -> None:
    """Train no further: Ray Train ends this group when the deadline (plus ``run.preemption_grace_s``) passes."""
    while True:
        time.sleep(1.0)
