"""fp32 means fp32: the trainer's setup decides whether float32 convolutions and matmuls may use TF32 on GPUs.

The flags are process-wide torch settings applied by trainer/parallelize.py on every device type, so they are
checked here on the CPU, after a real Trainer's setup (digits shards, no training step)."""
from __future__ import annotations

import pytest
import torch

from shards.manifest import load_classes
from trainer.config import build_config
from trainer.train import Placement, Trainer


def tf32_flags() -> tuple[bool, bool, str]:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.fixture
def restore_flags():
    """The process's TF32 settings are put back afterwards, whatever the test did to them."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.backends.cudnn.allow_tf32 = cudnn
    torch.set_float32_matmul_precision(matmul)


def set_up(digits_shards, tmp_path, preset: str, *sets: str) -> Trainer:
    cfg = build_config(preset, flags={"data.train": str(digits_shards.train), "data.val": str(digits_shards.val),
                                      "run.out": str(tmp_path / "run"), "run.workers": 0, "run.gpus_per_worker": 0},
                       sets=["model.width=0.05", "data.image_size=63", "train.batch_size=16", *sets])
    place = Placement(rank=0, world=1, local_rank=0, devices=(torch.device("cpu"),))
    return Trainer(cfg, load_classes(digits_shards.train), place, publish=lambda *a: None, log=lambda *a: None)


@pytest.mark.parametrize("preset, sets, tf32, note", [
    ("paper", [], False, "fp32, TF32 off"),                               # train.precision=fp32
    ("modern", [], False, "fp32, TF32 off"),                              # auto on the CPU: fp32
    ("modern", ["train.precision=bf16"], True, "bf16 autocast, TF32 on"),
])
def test_the_trainer_turns_tf32_off_for_fp32_runs(digits_shards, tmp_path, restore_flags, preset, sets, tf32, note):
    torch.backends.cudnn.allow_tf32 = not tf32                             # the opposite, to see it change
    torch.set_float32_matmul_precision("highest" if tf32 else "high")
    trainer = set_up(digits_shards, tmp_path, preset, *sets)
    assert tf32_flags() == (tf32, tf32, "high" if tf32 else "highest")
    assert trainer.cfg.precision_note() == note                           # what the start line says
