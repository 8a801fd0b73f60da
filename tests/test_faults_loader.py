"""Resuming a training loader mid-epoch sees exactly the samples an uninterrupted epoch would.

Real shards, both loaders: DALI restores its pipeline checkpoint (reader position, shuffle buffer, random
operators), the reference loader replays the epoch from its seeds and drops the batches already handed out.
"""
from __future__ import annotations

import pytest
import torch

from pipeline import LoaderConfig, make_train_loader


def _config(shard_dir, **kw) -> LoaderConfig:
    return LoaderConfig(shard_dir=str(shard_dir), batch_size=16, rank=1, world_size=2, image_size=64,
                        resize_shorter=73, num_threads=1, num_workers=2, shuffle_buffer=128, **kw)


def _epoch(loader, epoch: int, stop: int | None = None):
    loader.set_epoch(epoch)
    out = []
    for images, labels, keys in loader:
        out.append((images.clone(), labels.clone(), list(keys)))
        if stop is not None and len(out) == stop:
            return out, loader.state_dict()
    return out, None


@pytest.mark.parametrize("kind,crop", [("dali", "paper"), ("dali", "rrc"), ("reference", "paper")])
def test_resumed_epoch_continues_with_exactly_the_uninterrupted_batches(digits_shards, kind, crop):
    cfg = _config(digits_shards.train, crop=crop)
    full_loader = make_train_loader(cfg, kind=kind)
    full_loader.with_source = True
    full, _ = _epoch(full_loader, epoch=1)
    assert len(full) == len(full_loader) > 6

    first = make_train_loader(cfg, kind=kind)      # the run that is interrupted after 5 batches
    first.with_source = True
    head, state = _epoch(first, epoch=1, stop=5)
    assert state["epoch"] == 1 and state["step"] == 5
    del first

    resumed = make_train_loader(cfg, kind=kind)     # a new process would build a new loader
    resumed.with_source = True
    resumed.load_state_dict(state)
    tail, _ = _epoch(resumed, epoch=1)

    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        assert got[2] == want[2]                               # the same samples in the same order
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[0], want[0])                    # the same crops, flips and lighting
    keys = [k for batch in head + tail for k in batch[2]]
    assert len(keys) == len(set(keys))                         # none repeated

    # the next epoch after a resumed one is the ordinary next epoch
    after, _ = _epoch(resumed, epoch=2)
    fresh = make_train_loader(cfg, kind=kind)
    fresh.with_source = True
    expected, _ = _epoch(fresh, epoch=2)
    assert [b[2] for b in after] == [b[2] for b in expected]
