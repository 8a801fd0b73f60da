"""DDP across processes over the split model (model parallel inside a process, data parallel across them),
with torch.distributed's gloo backend on the CPU: two ranks, each splitting its model over two CPU devices,
train the same weights as one single-device model that sees both ranks' images. Dropout is 0 (masks differ)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from trainer.model import AlexNet
from trainer.parallel import split_two_devices

STEPS, PER_RANK, CLASSES, WIDTH = 3, 2, 10, 0.125


def data():
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(STEPS, 2 * PER_RANK, 3, 224, 224, generator=generator)
    labels = torch.randint(0, CLASSES, (STEPS, 2 * PER_RANK), generator=generator)
    return images, labels


def fresh_model() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(num_classes=CLASSES, width=WIDTH, dropout=0.0, init="kaiming")


def optimiser(params):
    return torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=5e-4)


def rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(split_two_devices(fresh_model(), ["cpu", "cpu"]), device_ids=None)
        opt = optimiser(model.parameters())
        images, labels = data()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(model(images[step, mine]), labels[step, mine])
            loss.backward()
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        if rank == 0:
            tmp = os.path.join(out_dir, "rank0.pt.tmp")
            torch.save({"state": model.module.state_dict(), "losses": losses}, tmp)
            os.replace(tmp, os.path.join(out_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_over_split_model_trains_like_one_single_device_model(tmp_path):
    mp.spawn(rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "rank0.pt", weights_only=True)

    model = fresh_model()
    opt = optimiser(model.parameters())
    images, labels = data()
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(images[step]), labels[step])   # both ranks' images, equal halves
        loss.backward()
        opt.step()
        losses.append(loss.item())

    assert losses[-1] != losses[0]                                  # the weights really moved
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-4)
    assert list(result["state"]) == list(model.state_dict())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(result["state"][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
