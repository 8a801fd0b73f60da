"""The reference loader: the same augmentations with Pillow + webdataset + a torch DataLoader.

It is the oracle for the DALI tests, the baseline of ``python -m pipeline bench`` and the fallback
where DALI is not installed (``--loader reference``): nothing here imports DALI.

It reads the same slice of the same tars as the DALI loader for a given (rank, epoch): the tar order
and the rank split (:mod:`pipeline.shardset`) are shared, so the two loaders see the same images.
The work is small generator stages over samples (each tested on plain lists), run in
``cfg.num_workers`` DataLoader processes that take turns by whole batches, so batches come back in
stored order for evaluation.

Resuming mid-epoch (``load_state_dict``) replays the epoch deterministically and drops the batches
already trained on: every draw comes from generators seeded by (seed, rank, epoch, worker), so the
remaining batches are exactly the uninterrupted ones. The skipped batches are still read and augmented
(the augmentation draws share one generator with the shuffle), which costs their loading time once.
``load_position`` (a position taken by a group of another size) reads the rank's share of the samples the
epoch has not consumed, as the DALI loader does (:meth:`pipeline.loader.Loader._parts`).
"""
from __future__ import annotations

import io
import math
import random
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from shards.manifest import ShardError

from .config import (IMAGENET_MEAN_255, IMAGENET_STD_255, LIGHTING_STD, TEN_CROP_POSITIONS, LoaderConfig,
                     derive_seed, lighting_matrix_255)
from .loader import Loader, label_error
from .shardset import Part, Shard, ShardSet, rank_range

_MEAN = np.array(IMAGENET_MEAN_255, dtype=np.float32)
_LIGHTING = lighting_matrix_255().astype(np.float32)


# --- stages over samples ------------------------------------------------------------------------

def read_range(shards: list[Shard], start: int, stop: int) -> Iterator[tuple[int, dict]]:
    """``(position, sample)`` for positions in [start, stop) of the tars read in order; tars wholly
    outside the range are not opened. Positions are relative to ``start``."""
    first = 0
    for shard in shards:
        last = first + shard.count
        if last > start and first < stop:
            position = first
            try:
                for sample in tarfile_samples([{"url": shard.tar}]):
                    if start <= position < stop:
                        yield position - start, sample
                    position += 1
                    if position >= stop:
                        break
            except ShardError:
                raise
            except Exception as e:
                raise unreadable(shard.tar, position - first, e) from None
            if position < min(last, stop):
                raise ended_early(shard, position - first)
        first = last
        if first >= stop:
            break


def read_parts(parts: list[Part]) -> Iterator[tuple[int, tuple[int, dict]]]:
    """``(position, (sample number, sample))`` for the samples of ``parts`` in order, positions counted from
    0; each tar is read up to its last wanted sample."""
    position = 0
    for part in parts:
        wanted, k = part.samples, 0
        if not len(wanted):
            continue
        try:
            read = 0
            for read, sample in enumerate(tarfile_samples([{"url": part.shard.tar}]), start=1):
                if read - 1 == wanted[k]:
                    yield position, (part.shard.first + read - 1, sample)
                    position, k = position + 1, k + 1
                    if k == len(wanted):
                        break
        except ShardError:
            raise
        except Exception as e:
            raise unreadable(part.shard.tar, wanted[k], e) from None
        if k < len(wanted):
            raise ended_early(part.shard, read)


def ended_early(shard: Shard, read: int) -> ShardError:
    """A tar that ends before its last sample: Python's tarfile stops without an error at a damaged header, so
    without this check the rest of the shard would be left out unnoticed (the epoch shorter, labels shifted)."""
    return ShardError(f"{shard.tar}: ends after {read} of its {shard.count} samples (a damaged tar header?); "
                      f"rebuild the split with `python -m shards build`")


def unreadable(tar: str, sample: int, error: Exception) -> ShardError:
    """A tarfile or webdataset error while reading ``tar``, as one line that names the shard and the fix."""
    first_line = (str(error).splitlines() or [""])[0][:200]
    return ShardError(f"{tar}: unreadable at sample {sample} ({type(error).__name__}: {first_line}); rebuild the "
                      f"split with `python -m shards build`")


def take_turns(items: Iterable[tuple[int, dict]], worker: int, num_workers: int,
               chunk: int) -> Iterator[tuple[int, dict]]:
    """Keep the positions of whole chunks ``k`` with ``k % num_workers == worker``: workers take
    turns by batch, so a DataLoader, which also takes turns, returns them in stored order."""
    for position, item in items:
        if (position // chunk) % num_workers == worker:
            yield position, item


def buffer_shuffle(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Shuffle through a buffer of ``size`` items, like DALI's reader (``initial_fill``)."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _concat(parts: tuple) -> torch.Tensor | list:
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [x for part in parts for x in part]


def rebatch(batches: Iterable[tuple], size: int) -> Iterator[tuple]:
    """Regroup a stream of batches (tuples of tensors or lists, any number of rows) into batches of
    exactly ``size`` rows; a partial remainder comes last."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += len(batch[0])
        while count >= size:
            joined = [_concat(parts) for parts in zip(*pending)]
            yield tuple(t[:size] for t in joined)
            rest = tuple(t[size:] for t in joined)
            count -= size
            pending = [rest] if count else []
    if count:
        yield tuple(_concat(parts) for parts in zip(*pending))


# --- one image ----------------------------------------------------------------------------------

def decode(sample: dict, shardset: ShardSet) -> tuple[Image.Image, int]:
    """The sample's RGB image, its EXIF orientation tag ignored (Pillow does not apply it; nor does the
    DALI graph), and its label."""
    where = shardset.shard_of(sample.get("__url__", "?"))
    for need in ("jpg", "cls"):
        if need not in sample:
            raise ShardError(f"{where}: sample {sample.get('__key__')} has no {need!r} component; "
                             "rebuild the split with `python -m shards build`")
    try:
        image = Image.open(io.BytesIO(sample["jpg"]))
        image = image.convert("RGB")
        label = int(sample["cls"])
    except Exception as e:
        raise ShardError(f"{where}: sample {sample.get('__key__')} is unreadable "
                         f"({type(e).__name__}: {e}); rebuild the split with `python -m shards build`") from None
    if not 0 <= label < len(shardset.classes):
        raise label_error(where, f"sample {sample.get('__key__')}", label, len(shardset.classes), shardset.root)
    return image, label


def paper_window(width: int, height: int, frac: float, ux: float, uy: float) -> tuple[int, int, int]:
    """Section 4.1's crop in original pixels (same arithmetic as the DALI graph): a square of side
    floor(s * frac) at a uniform position inside the central s x s square, s = the shorter side."""
    s = min(width, height)
    side = max(1, math.floor(s * frac))  # at least one pixel, as in the DALI graph
    return crop_offset(width, s, side, ux), crop_offset(height, s, side, uy), side


def crop_offset(length: int, s: int, side: int, u: float) -> int:
    """floor((length - s) / 2) + k with k uniform over all s - side + 1 whole-pixel positions for u in [0, 1)
    (33 for 224 of 256; ``u * (s - side)`` never reaches the last one)."""
    return (length - s) // 2 + min(math.floor(u * (s - side + 1)), s - side)


def rrc_window(width: int, height: int, rng: random.Random, area=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3), attempts: int = 10) -> tuple[int, int, int, int]:
    """Random-resized-crop's window (x0, y0, w, h): torchvision's sampling, centre crop fallback."""
    total = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = total * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if w <= h:
        return image.resize((size, max(1, round(h * size / w))), Image.BILINEAR)
    return image.resize((max(1, round(w * size / h)), size), Image.BILINEAR)


def crop_at(image: Image.Image, size: int, pos_x: float, pos_y: float, mirror: bool = False) -> Image.Image:
    """A size x size crop at a normalised position, rounded like DALI's crop_mirror_normalize."""
    w, h = image.size
    x0, y0 = math.floor(pos_x * (w - size) + 0.5), math.floor(pos_y * (h - size) + 0.5)
    patch = image.crop((x0, y0, x0 + size, y0 + size))
    return patch.transpose(Image.FLIP_LEFT_RIGHT) if mirror else patch


def normalize(image: Image.Image, shift: np.ndarray | None = None,
              std: tuple[float, float, float] = IMAGENET_STD_255) -> torch.Tensor:
    """HWC uint8 -> CHW float32, (x + shift - mean) / std; ``std`` is ``LoaderConfig.std_255`` (1 for
    ``normalize="mean"``: centred 0-255 values)."""
    pixels = np.asarray(image, dtype=np.float32)
    if shift is not None:
        pixels = pixels + shift
    return torch.from_numpy(np.ascontiguousarray(((pixels - _MEAN) / np.array(std, dtype=np.float32))
                                                 .transpose(2, 0, 1)))


def train_transform(image: Image.Image, cfg: LoaderConfig, rng: random.Random) -> torch.Tensor:
    w, h = image.size
    size = cfg.image_size
    if cfg.crop == "paper":
        x0, y0, side = paper_window(w, h, cfg.crop_fraction, rng.random(), rng.random())
        box = (x0, y0, x0 + side, y0 + side)
    else:
        x0, y0, cw, ch = rrc_window(w, h, rng)
        box = (x0, y0, x0 + cw, y0 + ch)
    image = image.resize((size, size), Image.BILINEAR, box=box)
    if cfg.flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    shift = None
    if cfg.use_lighting:
        shift = _LIGHTING @ np.array([rng.gauss(0.0, LIGHTING_STD) for _ in range(3)], dtype=np.float32)
    return normalize(image, shift, cfg.std_255)


def eval_transform(image: Image.Image, cfg: LoaderConfig) -> torch.Tensor:
    image = resize_shorter(image, cfg.resize_shorter)
    if not cfg.ten_crop:
        return normalize(crop_at(image, cfg.image_size, 0.5, 0.5), std=cfg.std_255)
    square = crop_at(image, cfg.resize_shorter, 0.5, 0.5)
    return torch.stack([normalize(crop_at(square, cfg.image_size, px, py, bool(m)), std=cfg.std_255)
                        for m in (0, 1) for py, px in TEN_CROP_POSITIONS])


# --- the dataset and the loaders ----------------------------------------------------------------

class _RankSlice(IterableDataset):
    """The rank's slice for one epoch, split among DataLoader workers by whole batches: ``parts`` (training),
    else its slice of the stored order. Yields (pixels, label, key, sample number)."""

    def __init__(self, cfg: LoaderConfig, shardset: ShardSet, train: bool, epoch: int,
                 parts: list[Part] | None = None, seed_parts: tuple[int, ...] | None = None):
        self.cfg, self.shardset, self.train, self.epoch = cfg, shardset, train, epoch
        self.parts, self.seed_parts = parts, seed_parts or (cfg.seed, cfg.rank, epoch)

    def _read(self) -> Iterator[tuple[int, tuple[int, dict]]]:
        if self.parts is not None:
            return read_parts(self.parts)
        shards = self.shardset.ordered(None)
        start, stop = rank_range(self.shardset.num_samples, self.cfg.rank, self.cfg.world_size)
        return ((p, (start + p, sample)) for p, sample in read_range(shards, start, stop))

    def __iter__(self):
        cfg = self.cfg
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        items = take_turns(self._read(), worker, workers, cfg.batch_size)
        rng = random.Random(derive_seed(*self.seed_parts, worker))
        if self.train:
            items = buffer_shuffle(items, max(1, cfg.shuffle_buffer // workers), rng)
        for position, (number, sample) in items:
            image, label = decode(sample, self.shardset)
            pixels = train_transform(image, cfg, rng) if self.train else eval_transform(image, cfg)
            yield pixels, label, sample["__key__"], number


def _one_line(e: Exception) -> ShardError:
    """A ShardError raised in a worker comes back wrapped in a traceback; keep its own line."""
    for line in reversed(str(e).splitlines()):
        if line.startswith("shards.manifest.ShardError: "):
            return ShardError(line.split(": ", 1)[1])
    return ShardError(str(e).strip().splitlines()[-1])


class _ReferenceLoader(Loader):
    """Each epoch is a fresh DataLoader over the rank's slice; resuming replays the epoch's first batches."""

    def _batches(self):
        cfg = self.cfg
        if self.train:
            parts = self._parts(self.epoch, self._base)
            if parts is None:   # the rank's slice of the epoch's tar order, as DALI's reader splits it
                start, stop = rank_range(self.shardset.num_samples, cfg.rank, cfg.world_size)
                parts = ShardSet.parts(self.shardset.ordered(derive_seed(cfg.seed, self.epoch)), None, start, stop)
            dataset = _RankSlice(cfg, self.shardset, True, self.epoch, parts, self._seed_parts(self.epoch, self._base))
        else:
            dataset = _RankSlice(cfg, self.shardset, False, self.epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                            prefetch_factor=2 if cfg.num_workers else None)
        try:
            yield from rebatch(loader, cfg.batch_size)
        except ShardError as e:
            raise _one_line(e) from None

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.cfg.layout == "NHWC":
            images = images.movedim(-3, -1).contiguous().movedim(-1, -3)
        return images.to({"float32": torch.float32, "float16": torch.float16,
                          "bfloat16": torch.bfloat16}[self.cfg.dtype])


class ReferenceTrainLoader(_ReferenceLoader):
    train = True

    def __iter__(self):
        skip = self._begin(self._take_resume())
        if skip >= self.steps:
            return
        for step, (images, labels, keys, numbers) in enumerate(self._batches(), start=self._first_step(self._base)):
            if step == self.steps:
                break
            if step < skip:
                continue
            self._mark(numbers.numpy())
            self._step = step + 1
            yield self._with_keys((self._finish(images), labels.to(self.device)), keys)


class ReferenceEvalLoader(_ReferenceLoader):
    train = False

    def __iter__(self):
        cfg, step = self.cfg, 0
        b, size = cfg.batch_size, cfg.image_size
        for images, labels, keys, _ in self._batches():
            yield self._with_keys(self._pad(images, labels) + (self._mask(step),), keys)
            step += 1
        shape = (b, 10, 3, size, size) if cfg.ten_crop else (b, 3, size, size)
        while step < self.steps:  # ranks with fewer images still run len(loader) steps
            padding = (self._finish(torch.zeros(shape)), torch.zeros(b, dtype=torch.int64, device=self.device))
            yield self._with_keys(padding + (self._mask(step),), [])
            step += 1

    def _pad(self, images, labels):
        b, n = self.cfg.batch_size, len(labels)
        if n < b:
            images = torch.cat([images, images.new_zeros((b - n, *images.shape[1:]))])
            labels = torch.cat([labels, labels.new_zeros(b - n)])
        return self._finish(images), labels.to(self.device)
