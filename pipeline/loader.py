"""What every loader shares, whatever reads and augments the images (DALI or Pillow).

:class:`Loader` holds the rank's slice of the split, the epoch, the resume position and the checks that
fail before a batch is read (device, batch size); subclasses only build their batches. Nothing here
imports DALI, so the reference loader keeps working without it.
"""
from __future__ import annotations

import torch

from shards.manifest import ShardError

from .config import LoaderConfig
from .shardset import ShardSet, eval_steps, rank_range, train_steps


def check_device(cfg: LoaderConfig) -> torch.device:
    """``cfg.device`` as a torch device, refused up front when this machine has no such GPU."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and device.index < torch.cuda.device_count()):
        raise ValueError(f"LoaderConfig.device={cfg.device!r}: no such CUDA device here "
                         f"({torch.cuda.device_count()} visible); use device=\"cpu\" or the device Ray assigned")
    return device


def label_error(where: str, sample: str, label: int, num_classes: int, root: str) -> ShardError:
    """A label past classes.json: a one-line error naming where the sample was read from and the fix."""
    return ShardError(f"{where}: {sample} has label {label}, outside 0..{num_classes - 1} (classes.json lists "
                      f"{num_classes} classes); find it with `python -m shards verify {root}` and rebuild the split")


class Loader:
    """A rank's view of one split: ``len()`` steps per epoch (the same on every rank), ``set_epoch``,
    and ``state_dict``/``load_state_dict`` holding ``{"epoch", "step"}`` (a subclass may add its own keys).

    Subclasses set ``train`` and implement ``__iter__``; they yield ``keys`` last when ``with_source`` is set, advance
    ``self._step`` as batches go out, and take the resume state once with :meth:`_take_resume`.
    """

    train: bool  # a training loader (shuffled, full batches) or an eval one (stored order, padded)

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.shardset = ShardSet.open(cfg.shard_dir)
        self.device = check_device(cfg)
        self.epoch = 0
        self.with_source = False          # tests: also yield each row's sample key
        self._resume: dict | None = None  # a state_dict() to continue from in its epoch
        self._step = 0                    # batches of the current epoch handed out so far
        n, ws, b = self.shardset.num_samples, cfg.world_size, cfg.batch_size
        self.steps = train_steps(n, ws, b) if self.train else eval_steps(n, ws, b)
        if self.steps < 1:
            raise ValueError(f"LoaderConfig.batch_size={b}: {cfg.shard_dir} has {n} samples, fewer than "
                             f"one batch per rank for world_size={ws}; lower batch_size")
        self.rank_start, rank_stop = rank_range(n, cfg.rank, ws)
        self.rank_samples = rank_stop - self.rank_start

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``; a loaded resume state for another epoch is dropped."""
        self.epoch = int(epoch)
        if self._resume is not None and self._resume["epoch"] != self.epoch:
            self._resume = None

    def state_dict(self) -> dict:
        """Where the current epoch stands: ``{"epoch", "step"}`` (batches handed out so far)."""
        return {"epoch": self.epoch, "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        """Continue epoch ``state["epoch"]`` after its first ``state["step"]`` batches on the next iteration."""
        self.epoch, self._resume = int(state["epoch"]), dict(state)

    def _take_resume(self) -> dict | None:
        """The loaded state for this iteration, once: the iteration after it starts the epoch afresh."""
        resume, self._resume = self._resume, None
        return resume

    def _mask(self, step: int) -> torch.Tensor:
        """Eval batch ``step``'s rows that hold one of the rank's images (False on padding), on the device."""
        b = self.cfg.batch_size
        return (torch.arange(step * b, (step + 1) * b) < self.rank_samples).to(self.device)

    def _with_keys(self, batch: tuple, keys: list[str]) -> tuple:
        return batch + ((keys,) if self.with_source else ())
