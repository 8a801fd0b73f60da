"""The recipe survives a resize: a run checkpointed mid-epoch by 2 ranks continues that epoch in 1 rank.

Phase A runs the real Trainer in two processes (a gloo group of 2, no Ray) until a NaN stops it after its
checkpoint at step 4 of the (one-epoch) run; phase B reruns it in this process as a group of 1 (max_workers 2: two micro-batches
of 16 per step). Nothing is mocked: real shards, the real DALI CPU loader, real checkpoints on the storage path.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from pipeline.loader import unpack
from pipeline.shardset import ShardSet
from trainer import checkpoint as ckpt
from trainer.config import build_config, config_from_dict
from trainer.loop import accumulate_step, train_step
from trainer.metrics import read_metrics
from trainer.model import AlexNet
from trainer.train import Placement, Trainer

STEPS, GLOBAL = 6, 32


def _config(shards, out: Path, *sets: str):
    return build_config(flags={"data.train": str(shards.train), "data.val": str(shards.val), "run.out": str(out)},
                        sets=["train.batch_size=32", "model.width=0.1", "data.image_size=64", "data.num_threads=1",
                              "train.epochs=1", f"train.max_steps_per_epoch={STEPS}", "train.log_every=3",
                              "run.workers=2", "run.min_workers=1", "run.max_workers=2", *sets])


def _rank_main(rank: int, cfg_dict: dict, classes: list[str], port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = config_from_dict(cfg_dict)
    Trainer(cfg, classes, Placement(rank, 2, rank, (torch.device("cpu"),)),
            ckpt.save_to_storage(Path(cfg.run.out) / "ray")).run()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoints(run: Path) -> list[dict]:
    return [torch.load(p / "checkpoint.pt", weights_only=True) for p in sorted((run / "ray").glob("checkpoint_*"))]


def test_a_mid_epoch_checkpoint_of_2_ranks_continues_in_1_with_the_same_steps_and_batch(digits_shards, tmp_path):
    run = tmp_path / "run"
    classes = list(ShardSet.open(digits_shards.train).classes)
    n = ShardSet.open(digits_shards.train).num_samples
    # A: 2 ranks; the NaN at step 5 stops them after the checkpoint at step 4
    a = _config(digits_shards, run, "train.checkpoint_every=2", "fault.nan_at_step=5")
    torch.multiprocessing.spawn(_rank_main, args=(a.to_dict(), classes, _free_port()), nprocs=2, join=True)
    state_a = _checkpoints(run)[-1]                            # the newest: after step 4
    assert (state_a["epoch"], state_a["step"], state_a["workers"]) == (-1, 4, 2)
    consumed_a = unpack(state_a["data"]["consumed"], n)
    assert consumed_a.sum() == 4 * GLOBAL

    # B: 1 rank in this process, 2 micro-batches of 16 per step; with no periodic checkpoints (checkpoint_every 0)
    # the resized group still saves after its first step: the resize is on record before anything else happens
    b = _config(digits_shards, run, "train.checkpoint_every=0", "fault.nan_at_step=5")
    trainer = Trainer(b, classes, Placement(0, 1, 0, (torch.device("cpu"),)), ckpt.save_to_storage(run / "ray"))
    assert (trainer.micro, trainer.accumulate, trainer.steps) == (16, 2, STEPS)
    assert trainer.run() == ""
    mid, end = _checkpoints(run)
    assert (mid["epoch"], mid["step"], mid["workers"]) == (-1, 5, 1)
    consumed_b = unpack(mid["data"]["consumed"], n)
    assert consumed_b.sum() == 5 * GLOBAL                   # 4 steps by A, 1 by B, no sample twice
    assert (consumed_b & consumed_a).sum() == consumed_a.sum()
    assert mid["resizes"] == [{"from": 2, "to": 1, "epoch": 0, "step": 4}]
    assert end["scheduler"]["steps_done"] == STEPS           # the schedule kept its step count
    (record,) = read_metrics(run)
    assert (record["epoch"], record["workers"], record["global_batch"]) == (0, 1, GLOBAL)
    assert record["resizes"] == [{"from": 2, "to": 1, "epoch": 0, "step": 4}]


def test_accumulated_micro_batches_give_the_global_batch_gradient():
    """Two micro-batches of 8 with loss scale 1/2 (one rank standing in for a group of 2) make the gradient
    of one batch of 16, up to float rounding."""
    torch.manual_seed(0)
    net = AlexNet(10, width=0.1, image_size=63)
    images, labels = torch.randn(16, 3, 63, 63), torch.randint(0, 10, (16,))
    net.eval()                                     # no dropout: both sides see the same function
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    criterion = torch.nn.CrossEntropyLoss()
    loss, norm = train_step(net, images, labels, optimizer=optimizer, criterion=criterion)
    whole = {k: p.grad.clone() for k, p in net.named_parameters()}
    micro_loss, micro_norm, micro_hits = accumulate_step(net, [(images[:8], labels[:8]), (images[8:], labels[8:])],
                                                         optimizer=optimizer, criterion=criterion, loss_scale=0.5)
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, whole[k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(micro_loss, loss)
    torch.testing.assert_close(micro_norm, norm)
    with torch.no_grad():
        assert int(micro_hits) == int((net(images).argmax(dim=1) == labels).sum())   # top-1 hits of both halves
    assert not torch.equal(net.fc8.weight.grad, torch.zeros_like(net.fc8.weight))


def _ddp_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.shardset import micro_range

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    net, batches = _net_and_micro_batches()
    model = DistributedDataParallel(net)
    first, stop = micro_range(3, rank, 2)              # rank 0 computes 1 micro-batch, rank 1 computes 2
    accumulate_step(model, batches[first:stop], optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                    criterion=torch.nn.CrossEntropyLoss(), loss_scale=2 / 3)
    torch.save({k: p.grad for k, p in net.named_parameters()}, f"{out}.{rank}")
    dist.destroy_process_group()


def _net_and_micro_batches():
    torch.manual_seed(0)
    net = AlexNet(10, width=0.1, image_size=63).eval()     # no dropout: every side computes the same function
    images, labels = torch.randn(24, 3, 63, 63), torch.randint(0, 10, (24,))
    return net, [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]


def test_ddp_ranks_with_uneven_micro_batches_all_reduce_the_global_batch_gradient(tmp_path):
    """2 ranks share a step of 3 micro-batches (1 and 2, under no_sync() but the last): DDP's all-reduce then
    gives both ranks the gradient of the whole batch of 24."""
    out = str(tmp_path / "grads")
    torch.multiprocessing.spawn(_ddp_rank, args=(_free_port(), out), nprocs=2, join=True)
    net, batches = _net_and_micro_batches()
    train_step(net, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
               optimizer=torch.optim.SGD(net.parameters(), lr=0.1), criterion=torch.nn.CrossEntropyLoss())
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for k, p in net.named_parameters():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6)
