"""Exactly once across group sizes: an epoch begun by 2 ranks, continued by 1, finished by 3.

Real shards, the real DALI CPU loader and the reference loader, one loader per rank built directly (``with_source``
gives each row's sample key). The position handed from one group to the next is only the merged bitmap of consumed
samples (pipeline/loader.py ``merge_positions``), so nothing of the old group's size travels with it.
"""
from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline import LoaderConfig, make_train_loader
from pipeline.loader import merge_positions, unpack
from pipeline.shardset import ShardSet, micro_range, share_range

MICRO, UNITS = 8, 6                 # micro-batch 8, 6 of them per global step: a global batch of 48
GLOBAL = MICRO * UNITS
EVEN_SAMPLES = 960                  # 20 global steps of 48: every sample is in the epoch


@pytest.fixture(scope="module")
def even_shards(digits_shards, tmp_path_factory):
    """A train split of 960 digits (96 per class) in 5 tars, built by the sharder."""
    from shards.build import BuildConfig, build

    root = tmp_path_factory.mktemp("even")
    for folder in sorted((digits_shards.raw / "train").iterdir()):
        (root / "raw" / folder.name).mkdir(parents=True)
        for jpg in sorted(folder.iterdir())[:EVEN_SAMPLES // 10]:
            shutil.copy(jpg, root / "raw" / folder.name / jpg.name)
    build(BuildConfig(str(root / "raw"), str(root / "train"), "train", max_count=200, seed=0), progress=False)
    assert ShardSet.open(root / "train").num_samples == EVEN_SAMPLES
    return root / "train"


def split_keys(shard_dir) -> list[str]:
    keys = []
    for shard in ShardSet.open(shard_dir).shards:
        keys += [line.split()[3].rsplit(".", 1)[0] for line in open(shard.index).read().splitlines()[1:]]
    return keys


def loaders(shard_dir, kind: str, world: int, units: int = UNITS):
    out = []
    for rank in range(world):
        cfg = LoaderConfig(shard_dir=str(shard_dir), batch_size=MICRO, rank=rank, world_size=world,
                           global_batch=MICRO * units, image_size=32, resize_shorter=36, num_threads=1,
                           num_workers=0, shuffle_buffer=32)
        loader = make_train_loader(cfg, kind)
        loader.with_source = True
        out.append(loader)
    return out


def consume(group, epoch: int, global_steps: int | None, position: dict | None):
    """Every rank takes its batches of ``global_steps`` global steps (None: to the epoch's end); returns the
    keys per rank and the merged position."""
    keys, running = [], []   # the iterators stay alive: a position is taken mid-iteration, as the trainer does
    for loader in group:
        if position is None:
            loader.set_epoch(epoch)
        else:
            loader.load_position(position)
        mine, batches = [], iter(loader)
        running.append(batches)
        wanted = None if global_steps is None else global_steps * loader.micro
        for images, labels, batch_keys in batches:
            assert images.shape[0] == labels.shape[0] == MICRO
            mine += batch_keys
            if wanted is not None and len(mine) == wanted * MICRO:
                break
        keys.append(mine)
    states = [loader.state_dict() for loader in group]
    return keys, merge_positions(states, group[0].shardset.num_samples)


@pytest.mark.parametrize("kind", ["dali", "reference"])
def test_an_epoch_resized_2_1_3_takes_every_sample_exactly_once(even_shards, kind):
    seen = Counter()
    a_keys, position = consume(loaders(even_shards, kind, 2), epoch=1, global_steps=5, position=None)
    assert [len(k) for k in a_keys] == [5 * GLOBAL // 2] * 2           # 3 micro-batches a step each
    assert unpack(position["consumed"], EVEN_SAMPLES).sum() == 5 * GLOBAL
    b_keys, position = consume(loaders(even_shards, kind, 1), epoch=1, global_steps=7, position=position)
    assert len(b_keys[0]) == 7 * GLOBAL
    assert unpack(position["consumed"], EVEN_SAMPLES).sum() == 12 * GLOBAL
    c_group = loaders(even_shards, kind, 3)
    c_keys, position = consume(c_group, epoch=1, global_steps=None, position=position)
    assert [len(k) for k in c_keys] == [8 * GLOBAL // 3] * 3
    assert all(len(loader) == 20 * 2 for loader in c_group)             # 20 global steps, 2 micro-batches each
    for keys in a_keys + b_keys + c_keys:
        seen.update(keys)
    assert seen == Counter(split_keys(even_shards))                       # the whole split, each sample once
    assert unpack(position["consumed"], EVEN_SAMPLES).all()


@pytest.mark.parametrize("kind", ["dali", "reference"])
def test_uneven_shares_and_a_split_that_does_not_divide(digits_shards, kind):
    """1438 samples, global batch 32 as 4 micro-batches of 8: 44 steps take 1408 distinct samples, the other
    30 sit the epoch out. 3 ranks compute 1, 1 and 2 micro-batches a step and read shares in proportion."""
    units = 4
    everything = set(split_keys(digits_shards.train))
    group = loaders(digits_shards.train, kind, 2, units)
    a_keys, position = consume(group, epoch=0, global_steps=9, position=None)
    group = loaders(digits_shards.train, kind, 3, units)
    assert [loader.micro for loader in group] == [1, 1, 2]
    assert len({len(loader) // loader.micro for loader in group}) == 1   # the same global steps on every rank
    c_keys, _ = consume(group, epoch=0, global_steps=None, position=position)
    keys = [k for ks in a_keys + c_keys for k in ks]
    assert len(keys) == len(set(keys)) == 1438 // 32 * 32
    assert set(keys) <= everything


def test_partition_helpers_cover_each_position_once():
    for units in range(1, 9):
        for world in range(1, units + 1):
            micro = [micro_range(units, r, world) for r in range(world)]
            assert micro[0][0] == 0 and micro[-1][1] == units
            assert all(a[1] == b[0] and a[1] > a[0] for a, b in zip(micro, micro[1:] + [(units, units + 1)]))
            for total in (units * 5, units * 5 + 3, 997):
                shares = [share_range(total, r, world, units) for r in range(world)]
                assert shares[0][0] == 0 and shares[-1][1] == total
                assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
                steps = total // units          # micro-batches of one sample: each share feeds `steps` steps
                assert all(stop - start >= steps * (m1 - m0) for (start, stop), (m0, m1) in zip(shares, micro))


def test_resuming_a_resized_reader_at_its_own_size_is_exact(even_shards):
    """The same-size resume stays exact after a resize: DALI's pipeline checkpoint of a reader over the rest
    of the epoch restores onto the same reader."""
    _, position = consume(loaders(even_shards, "dali", 2), epoch=0, global_steps=4, position=None)
    whole = loaders(even_shards, "dali", 1)[0]
    whole.load_position(position)
    batches = [(x.clone(), y.clone(), k) for x, y, k in whole]
    first = loaders(even_shards, "dali", 1)[0]
    first.load_position(position)
    running = iter(first)
    for _ in range(6):
        next(running)
    state = first.state_dict()
    assert state["step"] == 4 * UNITS + 6
    del first, running
    resumed = loaders(even_shards, "dali", 1)[0]
    resumed.load_state_dict(state)
    tail = [(x.clone(), y.clone(), k) for x, y, k in resumed]
    assert len(tail) == len(batches) - 6
    for got, want in zip(tail, batches[6:]):
        assert got[2] == want[2] and torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert np.array_equal(unpack(resumed.state_dict()["consumed"], EVEN_SAMPLES),
                          np.ones(EVEN_SAMPLES, dtype=bool))
