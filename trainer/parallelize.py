"""Every parallelism and placement applied to the model in one place, apart from the model itself.

Like torchtitan's ``parallelize_*``: :func:`parallelize` takes the plain :class:`~trainer.model.AlexNet` and
the config and returns ``(net, model)``: ``net`` holds the parameters (save and load it), ``model`` is what
the loop calls. The pieces are small ``apply_*`` functions applied in this order:

0. float32 precision: TF32 off for convolutions and matmuls unless the run uses bf16 autocast (process-wide
   torch flags; set on every device type, so the CPU runs the same code);
1. placement: the whole net on one device, or the paper's two columns on two devices (trainer/parallel.py);
2. channels_last memory format (faster convolutions on tensor-core GPUs);
3. DistributedDataParallel when there is more than one rank;
4. ``torch.compile``, outermost, so it sees DDP's hooks.

Where the step's kernels queue is picked apart, per run: :func:`training_stream` (``train.cuda_stream``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from trainer.config import Config


def apply_float32_precision(tf32: bool) -> None:
    """Whether float32 convolutions (cuDNN) and matmuls (cuBLAS; oneDNN on CPUs that have it) may run in TF32.
    Ampere and later GPUs do so by default for convolutions, which an fp32 run must not (docs/training.md,
    "Precision"). Only the legacy flags are set: torch refuses to read them back once mixed with its newer
    ``fp32_precision`` settings."""
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")   # also sets cuda.matmul.allow_tf32


def apply_placement(net: nn.Module, devices: Sequence[torch.device], two_columns: bool) -> nn.Module:
    if two_columns:
        from trainer.parallel import split_two_devices
        return split_two_devices(net, devices)      # one column per device (section 3.2); places itself
    return net.to(devices[0])


def apply_channels_last(net: nn.Module) -> nn.Module:
    return net.to(memory_format=torch.channels_last)


def apply_ddp(net: nn.Module, device: torch.device, single_device: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # device_ids only for a module on one CUDA device; a split module spans two and takes None
    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" and single_device else None)


def apply_compile(model: nn.Module) -> nn.Module:
    return torch.compile(model)


def parallelize(net: nn.Module, cfg: Config, devices: Sequence[torch.device], world: int) -> tuple[nn.Module, nn.Module]:
    """``(net, model)`` for this rank: ``devices`` are the worker's (two for ``run.parallel=model``)."""
    two_columns = cfg.run.parallel == "model"
    apply_float32_precision(cfg.use_tf32())
    net = apply_placement(net, devices, two_columns)
    if cfg.use_channels_last():
        net = apply_channels_last(net)
    model = net
    if world > 1:
        model = apply_ddp(model, devices[0], single_device=not two_columns)
    if cfg.use_compile():
        model = apply_compile(model)
    return net, model


@contextlib.contextmanager
def training_stream(kind: str, device: torch.device) -> Iterator[torch.cuda.Stream | None]:
    """The CUDA stream the training loop's work is queued on while the block runs (``train.cuda_stream``).

    ``"default"``: torch's current stream, the legacy default stream unless the caller changed it. ``"side"``: a
    stream of torch's pool, created non-blocking, so nothing another library queues on the legacy default stream
    (a synchronous ``cudaMemcpy``, say) waits for the training kernels queued before it, or holds up those after
    it. The side stream first waits for what the current stream has queued (the weights, the restored state), and
    the current stream waits for the side stream's work when the block ends. The loader hands its batches over
    to whichever stream is current (pipeline/dali_loader.py). Nothing changes on the CPU.
    """
    if kind != "side" or device.type != "cuda":
        yield None
        return
    outer = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(outer)
    try:
        with torch.cuda.stream(side):
            yield side
    finally:
        outer.wait_stream(side)
