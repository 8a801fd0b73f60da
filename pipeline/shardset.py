"""What both loaders know about a shard directory before reading a single image.

The manifest and the DALI index files say how many samples each tar holds, where each component
sits and how long the tar must be. Checking them up front turns a truncated shard or a sample
without a label into a one-line error naming the shard, instead of a failure deep inside DALI or a
DataLoader worker. The partition helpers are pure functions so they are tested on plain numbers.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.manifest import ShardError, load_classes, load_manifest

REQUIRED_COMPONENTS = ("jpg", "cls")
MAX_SIDE = 1 << 16  # JPEG's limit on a side


@dataclass(frozen=True)
class Shard:
    tar: str        # absolute path of the .tar
    index: str      # absolute path of its DALI index
    count: int      # samples in it
    first: int = 0  # the split-wide number of its first sample (tars in stored order, samples in tar order)


@dataclass(frozen=True)
class Part:
    """Some samples of one tar, as a rank reads them: ``samples`` are indices inside the tar, ascending."""
    shard: Shard
    samples: np.ndarray

    @property
    def whole(self) -> bool:
        return len(self.samples) == self.shard.count


# --- partitions (pure) --------------------------------------------------------------------------

def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [start, stop) sample positions of ``rank``: DALI's own split of a reader into shards."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def train_steps(num_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches per epoch, the same on every rank: the smallest rank's share, last batch dropped.
    Equal to ``num_samples // (world_size * batch_size)``: the epoch's global steps, whatever the split."""
    return (num_samples // world_size) // batch_size


def micro_range(units: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [first, stop) of the ``units`` micro-batches of a global step that ``rank`` computes: as even a split
    as whole micro-batches allow (``units // world_size`` or one more each); ``units == world_size``: one each."""
    return units * rank // world_size, units * (rank + 1) // world_size


def share_range(total: int, rank: int, world_size: int, units: int) -> tuple[int, int]:
    """The [start, stop) of ``total`` positions that ``rank`` reads, in proportion to its micro-batches:
    ``rank_range`` when every rank computes the same number. Each rank's share is at least
    ``floor(total * its micro-batches / units)``, so ``total >= steps * global batch`` feeds ``steps`` steps."""
    first, stop = micro_range(units, rank, world_size)
    return total * first // units, total * stop // units


def eval_steps(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches per eval pass on every rank: enough for the largest rank's share, the rest masked."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def shard_order(num_shards: int, seed: int | None) -> list[int]:
    """The order the tars are read in: as stored for eval (``seed=None``), else a permutation
    that is the same on every rank (so the ranks' slices stay disjoint) and new every epoch."""
    import random

    order = list(range(num_shards))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


# --- the shard directory ------------------------------------------------------------------------

def _parse_index(path: Path, tar: Path, expected: int, tar_bytes: int) -> None:
    """Check a DALI index (``v1.2 N`` then per sample ``ext offset size [name]`` groups)."""
    fix = f"rebuild the split with `python -m shards build` (or `python -m shards verify {tar.parent}`)"
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"{tar}: cannot read its index {path.name} ({e}); {fix}") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1.") or not (head[1].isascii() and head[1].isdigit()):
        raise ShardError(f"{tar}: index {path.name} has no 'v1.x N' header; {fix}")
    step = 4 if head[0] >= "v1.2" else 3
    if int(head[1]) != expected or len(lines) - 1 != expected:
        raise ShardError(f"{tar}: index lists {len(lines) - 1} samples, manifest.json says {expected}; {fix}")
    for i, line in enumerate(lines[1:]):
        fields = line.split()
        numbers = fields[1::step] + fields[2::step]
        if not fields or len(fields) % step or not all(f.isascii() and f.isdigit() for f in numbers):
            raise ShardError(f"{tar}: index {path.name} line {i + 2} is not 'ext offset size name' groups; {fix}")
        exts = fields[0::step]
        for need in REQUIRED_COMPONENTS:
            if need not in exts:
                name = fields[3] if step == 4 and len(fields) > 3 else f"#{i}"
                raise ShardError(f"{tar}: sample {i} ({name.rsplit('.', 1)[0]}) has no {need!r} "
                                 f"component; every sample needs {'+'.join(REQUIRED_COMPONENTS)}; {fix}")
        ends = [int(fields[k + 1]) + int(fields[k + 2]) for k in range(0, len(fields), step)]
        if max(ends) > tar_bytes:
            raise ShardError(f"{tar}: truncated ({tar_bytes} bytes, sample {i} ends at {max(ends)}); {fix}")


def _max_size(manifest: dict, root: Path, fix: str) -> tuple[int, int] | None:
    """manifest.json's ``max_width`` / ``max_height`` (GPU decoders preallocate for them); manifests written
    before the fields existed have neither."""
    if "max_width" not in manifest and "max_height" not in manifest:
        return None
    size = (manifest.get("max_width"), manifest.get("max_height"))
    if not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_SIDE for x in size):
        raise ShardError(f"{root / 'manifest.json'}: max_width / max_height {size} are not both whole pixel "
                         f"counts in 1..{MAX_SIDE}; {fix}")
    return size


@dataclass(frozen=True)
class ShardSet:
    """A validated shard directory: its tars in stored order, their counts and the class names."""

    root: str
    split: str
    shards: tuple[Shard, ...]
    classes: tuple[str, ...]
    max_size: tuple[int, int] | None = None  # the largest stored (width, height); None: an older manifest

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @classmethod
    def open(cls, shard_dir: str | os.PathLike) -> "ShardSet":
        root = Path(shard_dir).resolve()
        manifest = load_manifest(root)
        classes = tuple(load_classes(root))
        fix = f"rebuild the split with `python -m shards build` (check with `python -m shards verify {root}`)"
        shards, first = [], 0
        for entry in manifest["shards"]:
            tar, index = root / entry["name"], root / entry["index"]
            size = tar.stat().st_size
            if size != entry["bytes"]:
                what = "truncated" if size < entry["bytes"] else "changed"
                raise ShardError(f"{tar}: {what} ({size} bytes, manifest.json says {entry['bytes']}); {fix}")
            _parse_index(index, tar, entry["count"], size)
            shards.append(Shard(str(tar), str(index), int(entry["count"]), first))
            first += int(entry["count"])
        return cls(str(root), manifest["split"], tuple(shards), classes, _max_size(manifest, root, fix))

    def ordered(self, seed: int | None) -> list[Shard]:
        return [self.shards[i] for i in shard_order(len(self.shards), seed)]

    @staticmethod
    def tars_covering(order: list[Shard], start: int, stop: int) -> list[str]:
        """The tars holding positions [start, stop) of the shards read in ``order``."""
        found, first = [], 0
        for shard in order:
            if first < stop and first + shard.count > start:
                found.append(shard.tar)
            first += shard.count
        return found

    @staticmethod
    def parts(order: list[Shard], keep: np.ndarray | None, start: int, stop: int) -> list[Part]:
        """Positions [start, stop) of the samples ``keep`` marks (a bool per split-wide sample number; None:
        all), counted through the tars in ``order`` and each tar in its own order: what one rank reads."""
        found, position = [], 0
        for shard in order:
            inside = (np.arange(shard.count) if keep is None
                      else np.flatnonzero(keep[shard.first:shard.first + shard.count]))
            lo, hi = max(start - position, 0), min(stop - position, len(inside))
            if lo < hi:
                found.append(Part(shard, inside[lo:hi]))
            position += len(inside)
            if position >= stop:
                break
        return found

    def shard_of(self, path: str) -> str:
        """The tar a DALI ``source_info`` (``/dir/x.tar:offset:name``) or webdataset url points at."""
        for s in self.shards:
            if path.startswith(s.tar) or path == s.index:
                return s.tar
        return path


# --- sample numbers -----------------------------------------------------------------------------

def index_lines(index: str) -> tuple[str, tuple[str, ...]]:
    """A DALI index's version (``v1.x``) and its sample lines, one per sample in tar order."""
    lines = Path(index).read_text().splitlines()
    return lines[0].split()[0], tuple(lines[1:])


@functools.lru_cache(maxsize=8192)   # a few int64 per sample; read only for tars a rank reads
def jpg_offsets(index: str) -> np.ndarray:
    """Each sample's ``jpg`` offset in its tar (ascending): what DALI's ``source_info`` names a sample by."""
    version, lines = index_lines(index)
    step = 4 if version >= "v1.2" else 3   # ext offset size [name] per component
    offsets = []
    for line in lines:
        fields = line.split()
        offsets.append(int(fields[fields[0::step].index("jpg") * step + 1]))
    return np.asarray(offsets, dtype=np.int64)


def write_index(part: Part, path: str | os.PathLike) -> None:
    """A DALI index for the samples of ``part`` only: DALI's reader then reads just those from the whole tar."""
    version, lines = index_lines(part.shard.index)
    Path(path).write_text(f"{version} {len(part.samples)}\n" + "".join(lines[i] + "\n" for i in part.samples))
