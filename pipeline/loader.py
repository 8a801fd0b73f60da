"""What every loader shares, whatever reads and augments the images (DALI or Pillow).

:class:`Loader` holds the rank's slice of the split, the epoch, the resume position and the checks that
fail before a batch is read (device, batch size); subclasses only build their batches. Nothing here
imports DALI, so the reference loader keeps working without it.

The data position (docs/pipeline.md, "Position in an epoch"): a training loader marks every sample it hands
out in a bitmap over the split's sample numbers. The union of the ranks' bitmaps (:func:`merge_positions`)
does not depend on the group's size, and :meth:`Loader.load_position` continues the epoch from it in a group
of any size: the samples not yet consumed, in the epoch's order, split among the ranks.
"""
from __future__ import annotations

import numpy as np
import torch

from shards.manifest import ShardError

from .config import LoaderConfig, derive_seed
from .shardset import Part, ShardSet, eval_steps, micro_range, rank_range, share_range


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


# --- the data position: a bitmap over sample numbers ------------------------------------------------

def pack(mask: np.ndarray) -> torch.Tensor:
    """A bool per sample as bits in a uint8 tensor (160 KB for ImageNet's 1.28 M), safe for weights_only."""
    return torch.from_numpy(np.packbits(mask))


def unpack(bits: torch.Tensor, num_samples: int) -> np.ndarray:
    return np.unpackbits(np.asarray(bits, dtype=np.uint8), count=num_samples).astype(bool)


def merge_positions(states: list[dict], num_samples: int) -> dict:
    """The group's position in its epoch from every rank's ``state_dict()``: ``{"epoch", "consumed"}``, the
    samples any rank has handed out this epoch, whatever the group's size."""
    epochs = {int(s["epoch"]) for s in states}
    if len(epochs) != 1:
        raise ValueError(f"ranks are in different epochs {sorted(epochs)}; a position needs one")
    consumed = np.zeros(num_samples, dtype=bool)
    for s in states:
        consumed |= unpack(s["consumed"], num_samples)
    return {"epoch": epochs.pop(), "consumed": pack(consumed)}


class Loader:
    """A rank's view of one split: ``len()`` batches per epoch, ``set_epoch``, and ``state_dict``/
    ``load_state_dict`` holding ``{"epoch", "step"}`` (training loaders add their bitmap of consumed samples;
    a subclass may add its own keys); training loaders also :meth:`load_position`.

    A training epoch is ``N // global_batch`` global steps (the rest of the split, fewer than one global
    batch, sits that epoch out); a rank computes ``micro`` batches of each (1 unless ``global_batch`` says
    otherwise), so ``len() = global steps * micro``, the same on every rank when ``micro`` is.

    Subclasses set ``train`` and implement ``__iter__``; they yield ``keys`` last when ``with_source`` is set, advance
    ``self._step`` and :meth:`_mark` the samples as batches go out, and take the resume state once with
    :meth:`_take_resume` (then :meth:`_begin`).
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
        first, stop = micro_range(cfg.units, cfg.rank, ws)
        self.micro = stop - first if self.train else 1   # batches per global step on this rank
        self.steps = n // (cfg.units * b) * self.micro if self.train else eval_steps(n, ws, b)
        if self.steps < 1:
            raise ValueError(f"LoaderConfig.batch_size={b}: {cfg.shard_dir} has {n} samples, fewer than "
                             f"one batch per rank for world_size={ws}; lower batch_size")
        self.rank_start, rank_stop = rank_range(n, cfg.rank, ws)
        self.rank_samples = rank_stop - self.rank_start
        self._consumed = np.zeros(n if self.train else 0, dtype=bool)   # samples handed out this epoch
        self._base: np.ndarray | None = None   # the samples this epoch's reader leaves out; None: none
        self._by_tar = {s.tar: s for s in self.shardset.shards}

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``; a loaded resume state for another epoch is dropped."""
        self.epoch = int(epoch)
        if self._resume is not None and self._resume["epoch"] != self.epoch:
            self._resume = None

    def state_dict(self) -> dict:
        """Where the current epoch stands: ``{"epoch", "step"}`` (batches handed out so far); for training also
        ``"consumed"`` (this rank's samples so far, packed bits) and ``"base"`` (those its reader left out)."""
        state = {"epoch": self.epoch, "step": self._step}
        if self.train:
            state.update(consumed=pack(self._consumed), base=None if self._base is None else pack(self._base))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue epoch ``state["epoch"]`` after its first ``state["step"]`` batches on the next iteration,
        exactly as this rank of a group of this size would have (``state`` from this rank's ``state_dict``)."""
        self.epoch, self._resume = int(state["epoch"]), dict(state)

    def load_position(self, position: dict) -> None:
        """Continue epoch ``position["epoch"]`` (from :func:`merge_positions`, taken by a group of any size)
        with the samples it has not consumed, in the epoch's order, this rank's share of them."""
        n, per_step = self.shardset.num_samples, self.cfg.units * self.cfg.batch_size
        consumed = unpack(position["consumed"], n)
        done = int(consumed.sum())
        if done % per_step:
            raise ValueError(f"a data position with {done} samples consumed is not a whole number of global steps "
                             f"of {per_step} samples; resume with the run's train.batch_size")
        self.epoch = int(position["epoch"])
        self._resume = {"epoch": self.epoch, "step": done // per_step * self.micro, "consumed": pack(consumed),
                        "base": pack(consumed)}

    def _take_resume(self) -> dict | None:
        """The loaded state for this iteration, once: the iteration after it starts the epoch afresh."""
        resume, self._resume = self._resume, None
        return resume

    def _begin(self, resume: dict | None) -> int:
        """Set up the epoch's bookkeeping from a resume state (or afresh); return the first batch's step."""
        n = self.shardset.num_samples
        if self.train:
            self._consumed = unpack(resume["consumed"], n) if resume and "consumed" in resume else np.zeros(n, bool)
            base = resume.get("base") if resume else None
            self._base = None if base is None else unpack(base, n)
        self._step = int(resume["step"]) if resume else 0
        return self._step

    def _first_step(self, base: np.ndarray | None) -> int:
        """The step at which a reader that leaves out ``base`` starts (0 for a whole epoch's reader)."""
        return 0 if base is None else int(base.sum()) // (self.cfg.units * self.cfg.batch_size) * self.micro

    def _seed_parts(self, epoch: int, base: np.ndarray | None) -> tuple[int, ...]:
        """(seed, rank, epoch) for the random streams; a reader over the rest of an epoch adds the number of
        samples consumed before it, so it does not replay the draws of the epoch's start."""
        parts = (self.cfg.seed, self.cfg.rank, epoch)
        return parts if base is None else parts + (int(base.sum()),)

    def _parts(self, epoch: int, base: np.ndarray | None) -> list[Part] | None:
        """What this rank reads in ``epoch``: None for DALI's own split of all tars (a fresh epoch with one batch
        per rank per step, as a fixed group always runs), else its share of the samples not in ``base``."""
        cfg = self.cfg
        if base is None and cfg.units == cfg.world_size:
            return None
        keep = None if base is None else ~base
        total = self.shardset.num_samples if keep is None else int(keep.sum())
        start, stop = share_range(total, cfg.rank, cfg.world_size, cfg.units)
        return ShardSet.parts(self.shardset.ordered(derive_seed(cfg.seed, epoch)), keep, start, stop)

    def _mark(self, numbers: np.ndarray) -> None:
        """Record samples (split-wide numbers) as handed out."""
        self._consumed[numbers] = True

    def _mask(self, step: int) -> torch.Tensor:
        """Eval batch ``step``'s rows that hold one of the rank's images (False on padding), on the device."""
        b = self.cfg.batch_size
        return (torch.arange(step * b, (step + 1) * b) < self.rank_samples).to(self.device)

    def _with_keys(self, batch: tuple, keys: list[str]) -> tuple:
        return batch + ((keys,) if self.with_source else ())
