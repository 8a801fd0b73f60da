"""The paper's two-GPU split (section 3.2), kept apart from the model like torchtitan's ``apply_*``.

``split_two_devices(model, devices)`` returns a :class:`TwoColumnAlexNet` that computes the same function as
``model`` (the single-device grouped form in ``trainer/model.py``) with each column on its own device:

    layer   column c on devices[c] holds        reads
    conv1   half the kernels (48 of 96)          the whole image (copied to both devices)
    conv2   half (128 of 256)                    its own column's conv1 maps only
    conv3   half (192 of 384)                    BOTH columns' conv2 maps      <- activations cross devices
    conv4   half (192 of 384)                    its own column only
    conv5   half (128 of 256)                    its own column only
    fc6     half the neurons (2048 of 4096)      BOTH columns' conv5 maps      <- cross
    fc7     half (2048 of 4096)                  BOTH columns' fc6 neurons     <- cross
    fc8     all of it, on devices[0]             BOTH columns' fc7 neurons     <- cross; the loss is here too

Checkpoints are interchangeable with the single-device model: each split layer's ``state_dict`` shows the
whole layer under the single-device name (``conv1.weight`` [96, 3, 11, 11], ...), joining the two column
halves along the output dimension, and ``load_state_dict`` splits a whole-layer tensor back into the
halves. The parameters themselves are ordinary leaf tensors, one per column, on their column's device, so
optimizers and DDP (``device_ids=None`` for a module spanning devices) see them as they are.

Concurrency. On CUDA, kernel launches are asynchronous, so issuing column 0's work and then column 1's
from one Python thread already runs them at the same time on two GPUs; cross-device copies are
``non_blocking`` and PyTorch orders them against each device's current stream. When both columns share one
GPU, column 1 runs on its own side stream (one stream per column), with explicit waits at the crossing
points; autograd runs each backward op on its forward op's stream, so the backward pass overlaps the same way.
On the CPU the two columns' forward work can run in two Python threads (torch ops release the GIL):
``concurrent=True``. The autograd engine runs CPU backward work on a single thread, so only the forward
pass overlaps there; see docs/model-parallel.md and bench/split.py for what that buys on a small CPU.

Dropout. Both columns' masks for fc6 and fc7 are drawn at the start of ``forward``, in the caller's thread,
in a fixed order, each from its column's device generator: a helper thread drawing its own from the shared
CPU generator would take numbers in thread-timing order, and a run with dropout would not repeat bit for bit.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
from torch import nn

from trainer.model import COLUMNS, AlexNet, ColumnLRN

# Layers that the paper splits into columns, and whether each column reads both columns' outputs of the
# layer before (True: activations cross devices to reach it) or only its own column's (grouped layers).
SPLIT_LAYERS = {"conv1": False, "conv2": False, "conv3": True, "conv4": False, "conv5": False,
                "fc6": True, "fc7": True}


# --------------------------------------------------------------------------------------------- checks

def _normalise_devices(devices: Sequence[torch.device | str | int]) -> list[torch.device]:
    if isinstance(devices, (str, torch.device, int)) or not hasattr(devices, "__len__"):
        raise ValueError(
            f"split_two_devices needs a list of exactly {COLUMNS} devices (one per column), got {devices!r}; "
            "pass e.g. ['cuda:0', 'cuda:1'], ['cuda:0', 'cuda:0'] (one GPU, two streams) or ['cpu', 'cpu']")
    if len(devices) != COLUMNS:
        raise ValueError(
            f"split_two_devices needs exactly {COLUMNS} devices (one per column of the paper's net), got "
            f"{len(devices)}: {[str(d) for d in devices]}; a worker for --parallel model needs 2 GPUs "
            "(--gpus-per-worker 2), or pass ['cpu', 'cpu'] to run the split on the CPU")
    out = []
    for d in devices:
        d = torch.device(d)
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {d} asked for, but torch sees no CUDA GPU; pass ['cpu', 'cpu'] instead")
            index = torch.cuda.current_device() if d.index is None else d.index
            if index >= torch.cuda.device_count():
                raise ValueError(f"device {d} asked for, but torch sees only {torch.cuda.device_count()} GPU(s)")
            d = torch.device("cuda", index)
        elif d.type != "cpu":
            raise ValueError(f"split_two_devices supports 'cpu' and 'cuda' devices, got {d}")
        out.append(d)
    if out[0].type != out[1].type:
        raise ValueError(f"both columns must be on the same kind of device, got {out[0]} and {out[1]}")
    return out


# ----------------------------------------------------------------------------- one layer, two columns

def _column_half(layer: nn.Conv2d | nn.Linear, column: int) -> nn.Conv2d | nn.Linear:
    """A new layer holding ``column``'s half of ``layer``'s output units (and, for a grouped conv, reading
    only that column's half of the inputs), with the weights copied from ``layer``."""
    half = layer.out_features // COLUMNS if isinstance(layer, nn.Linear) else layer.out_channels // COLUMNS
    rows = slice(column * half, (column + 1) * half)
    if isinstance(layer, nn.Linear):
        part = nn.Linear(layer.in_features, half)
    else:
        if layer.groups not in (1, COLUMNS):
            raise ValueError(f"cannot split a conv with groups={layer.groups} into {COLUMNS} columns")
        part = nn.Conv2d(layer.in_channels // layer.groups, half, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding)
    with torch.no_grad():
        part.weight.copy_(layer.weight[rows])   # grouped weights: group c's kernels are rows c*half..
        part.bias.copy_(layer.bias[rows])
    return part


def _join_columns(module: "ColumnSplit", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: ``conv3.columns.0.weight`` + ``conv3.columns.1.weight`` -> ``conv3.weight``."""
    target = module.columns[0].weight.device
    for name in ("weight", "bias"):
        halves = [state_dict.pop(f"{prefix}columns.{c}.{name}") for c in range(COLUMNS)]
        state_dict[prefix + name] = torch.cat([h.to(target) for h in halves], dim=0)


def _split_columns(module: "ColumnSplit", state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                   missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook: ``conv3.weight`` -> one half per column, each moved to its column's device.
    A state dict saved from the split layer's own parameter names loads as it is."""
    for name in ("weight", "bias"):
        whole = state_dict.pop(prefix + name, None)
        if whole is None:
            continue
        expected = sum(getattr(col, name).shape[0] for col in module.columns)
        if whole.shape[0] != expected:
            error_msgs.append(f"size mismatch for {prefix}{name}: copying a param with shape "
                              f"{tuple(whole.shape)}, the split model has {expected} rows in two columns")
            continue
        for c, half in enumerate(whole.chunk(COLUMNS, dim=0)):
            state_dict[f"{prefix}columns.{c}.{name}"] = half.to(getattr(module.columns[c], name).device)


# register_state_dict_post_hook marks the function itself; do it once so re-registering is allowed.
_join_columns._from_public_api = True  # type: ignore[attr-defined]


class ColumnSplit(nn.Module):
    """One learned layer split into the paper's two columns: ``columns[c]`` holds output units
    ``c*half .. (c+1)*half`` on ``devices[c]``. Its state dict shows the whole layer (``weight``, ``bias``)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, devices: Sequence[torch.device]):
        super().__init__()
        self.columns = nn.ModuleList(_column_half(layer, c).to(devices[c]) for c in range(COLUMNS))
        self.register_state_dict_post_hook(_join_columns)
        self.register_load_state_dict_pre_hook(_split_columns)

    def forward(self, *args, **kwargs):
        raise RuntimeError("ColumnSplit holds two columns; call columns[c] on column c's input")


# ------------------------------------------------------------------------------------ the split net

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _column_thread() -> ThreadPoolExecutor:
    """One helper thread per process runs column 1's CPU work while the caller's thread runs column 0."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alexnet-column-1")
        return _POOL


class TwoColumnAlexNet(nn.Module):
    """AlexNet with column c of every split layer on ``devices[c]``; fc8 (and so the loss) on devices[0].

    Feed images on any device; the logits come back on ``output_device``. The module places itself: moving
    it with ``.to(device)`` / ``.cuda()`` would put both columns on one device behind ``devices``' back
    (``.to(memory_format=...)`` and dtype casts are fine)."""

    def __init__(self, model: AlexNet, devices: Sequence[torch.device], concurrent: bool = True):
        super().__init__()
        self.devices = list(devices)
        self.input_device = self.output_device = self.devices[0]
        self.num_classes, self.width, self.widths = model.num_classes, model.width, dict(model.widths)
        self.image_size = getattr(model, "image_size", 224)
        self.concurrent = concurrent
        for name in SPLIT_LAYERS:
            setattr(self, name, ColumnSplit(getattr(model, name), self.devices))
        self.fc8 = nn.Linear(model.fc8.in_features, model.fc8.out_features).to(self.devices[0])
        with torch.no_grad():
            self.fc8.weight.copy_(model.fc8.weight)
            self.fc8.bias.copy_(model.fc8.bias)
        lrn = model.lrn   # each column normalises its own maps: ColumnLRN over one column
        self.lrn = ColumnLRN(1, size=lrn.size, alpha=lrn.alpha, beta=lrn.beta, k=lrn.k) \
            if isinstance(lrn, ColumnLRN) else nn.Identity()
        self.act = model.act
        self.pool = nn.MaxPool2d(model.pool.kernel_size, model.pool.stride)
        self.dropout = nn.Dropout(model.dropout.p)
        self.train(model.training)
        # One GPU, two columns: column 1 gets its own stream so the columns can overlap on that GPU.
        same_gpu = self.devices[0].type == "cuda" and self.devices[0] == self.devices[1]
        self._side_stream = torch.cuda.Stream(self.devices[1]) if same_gpu and concurrent else None
        self._streams: list = [None, None]

    def extra_repr(self) -> str:
        return f"devices={[str(d) for d in self.devices]}, concurrent={self.concurrent}"

    # -- how work is spread over the two columns

    def _stream_context(self, c: int):
        if self._side_stream is not None and c == 1:
            return torch.cuda.stream(self._side_stream)
        return contextlib.nullcontext()

    def _per_column(self, stage: Callable[[int, torch.Tensor], torch.Tensor], inputs: list[torch.Tensor]
                    ) -> list[torch.Tensor]:
        """Run ``stage(c, inputs[c])`` for both columns at the same time: on CUDA by launching both (launches
        are asynchronous; column 1 on its own stream when both share a GPU); on the CPU in two threads."""
        if self.devices[0].type == "cpu" and self.concurrent:
            # Grad mode and autocast are per thread: the helper thread must run as the caller does.
            grad, cast = torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")
            cast_dtype = torch.get_autocast_dtype("cpu")

            def column_one():
                with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=cast_dtype, enabled=cast):
                    return stage(1, inputs[1])

            future = _column_thread().submit(column_one)
            first = stage(0, inputs[0])
            return [first, future.result()]
        outputs = []
        for c in range(COLUMNS):
            with self._stream_context(c):
                outputs.append(stage(c, inputs[c]))
        return outputs

    def _fetch(self, tensor: torch.Tensor, source: int, c: int) -> torch.Tensor:
        """``tensor``, made by column ``source`` (-1: by neither), on column ``c``'s device, ordered after its
        producer. Between GPUs, PyTorch's copy orders itself against both devices' current streams."""
        if self._side_stream is not None and source not in (-1, c):
            here = torch.cuda.current_stream(self.devices[c])
            here.wait_stream(self._streams[source])
            tensor.record_stream(here)   # the producer's stream must not reuse this memory before we read it
        return tensor.to(self.devices[c], non_blocking=True)

    def _join_on(self, outputs: list[torch.Tensor], c: int) -> torch.Tensor:
        """Both columns' outputs joined along channels on column c's device, in column c's stream."""
        with self._stream_context(c):
            return torch.cat([self._fetch(h, source, c) for source, h in enumerate(outputs)], dim=1)

    def _cross(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The crossing points of section 3.2: every column gets both columns' outputs. Both joins are issued
        before either column computes on, so neither column's stream waits for the other's next layer."""
        return [self._join_on(outputs, c) for c in range(COLUMNS)]

    def _dropout_masks(self, batch: int) -> dict[str, list[torch.Tensor | None]]:
        """fc6's and fc7's dropout masks, ``[column 0, column 1]`` each on its column's device, already scaled by
        1 / (1 - p) as ``nn.Dropout`` does; drawn in this thread in a fixed order (see the module docstring)."""
        p = self.dropout.p
        if not self.training or p == 0:
            return {"fc6": [None, None], "fc7": [None, None]}
        keep = 1.0 - p
        masks = {name: [torch.empty(batch, getattr(self, name).columns[c].out_features, device=self.devices[c])
                        .bernoulli_(keep).div_(keep) for c in range(COLUMNS)] for name in ("fc6", "fc7")}
        if self._side_stream is not None:   # drawn on the current stream, read on column 1's side stream
            for name in masks:
                masks[name][1].record_stream(self._side_stream)
        return masks

    # -- the network, column by column (same order of operations as AlexNet.features / classifier)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        masks = self._dropout_masks(images.shape[0])   # before the side stream's wait below: it orders them
        if self._side_stream is not None:
            self._streams = [torch.cuda.current_stream(self.devices[0]), self._side_stream]
            # column 1's weights were last written (optimizer step) on the caller's stream
            self._side_stream.wait_stream(self._streams[0])
        source = self.devices.index(images.device) if images.device in self.devices else -1
        image_per_column = []
        for c in range(COLUMNS):                       # conv1 of every column sees the whole image
            with self._stream_context(c):
                image_per_column.append(self._fetch(images, source, c))

        act = self.act

        def conv1_conv2(c, x):      # each column only its own maps
            x = self.pool(self.lrn(act(self.conv1.columns[c](x))))
            return self.pool(self.lrn(act(self.conv2.columns[c](x))))

        def conv3_conv4_conv5(c, x):    # x: both columns' conv2 maps; conv4, conv5 see their own column only
            x = act(self.conv3.columns[c](x))
            x = act(self.conv4.columns[c](x))
            # flattening each column's (N, C/2, 6, 6) and joining them keeps AlexNet's channel-major order
            return torch.flatten(self.pool(act(self.conv5.columns[c](x))), 1)

        def fc6(c, x):
            return _drop(act(self.fc6.columns[c](x)), masks["fc6"][c])

        def fc7(c, x):
            return _drop(act(self.fc7.columns[c](x)), masks["fc7"][c])

        maps = self._per_column(conv1_conv2, image_per_column)
        maps = self._per_column(conv3_conv4_conv5, self._cross(maps))
        neurons = self._per_column(fc6, self._cross(maps))
        neurons = self._per_column(fc7, self._cross(neurons))
        return self.fc8(self._join_on(neurons, 0))     # fc8 and the loss on devices[0]


def _drop(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Dropout with a mask drawn beforehand (None: eval mode or p = 0); the mask takes x's dtype (autocast)."""
    return x if mask is None else x * mask.to(x.dtype)


def split_two_devices(model: AlexNet, devices: Sequence[torch.device | str], concurrent: bool = True
                      ) -> TwoColumnAlexNet:
    """Place ``model``'s two columns on ``devices`` (section 3.2 of the paper); returns a new module with a copy
    of the weights and the same state-dict keys and shapes. ``model`` itself is left as it was.

    ``devices``: exactly two, e.g. ``["cuda:0", "cuda:1"]``; ``["cuda:0", "cuda:0"]`` runs the columns on two
    streams of one GPU; ``["cpu", "cpu"]`` runs the same code on the CPU. ``concurrent=False`` runs the columns
    one after the other: on the CPU in one thread (True: column 1's forward work in a helper thread), on one
    GPU on one stream (True: column 1 on a side stream). Two GPUs always overlap (asynchronous launches).
    """
    devices = _normalise_devices(devices)
    if not isinstance(model, AlexNet):
        raise ValueError(f"split_two_devices splits trainer.model.AlexNet, got {type(model).__name__}")
    if getattr(model, "columns", COLUMNS) != COLUMNS:
        raise ValueError(f"split_two_devices places the two columns of the paper's net on two devices; this "
                         f"AlexNet has model.columns={model.columns}: use --parallel data or model.columns=2")
    return TwoColumnAlexNet(model, devices, concurrent=concurrent)
