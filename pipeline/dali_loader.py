"""The DALI input pipeline: WebDataset shards -> decoded, augmented, normalised batches.

:func:`build_pipeline` is the one function that builds the graph. ``cfg.device`` picks where it runs:
``"cpu"`` gives ``device_id=None`` and CPU operators; ``"cuda:N"`` gives ``device_id=N``, nvJPEG
decoding (``device="mixed"``, with the hardware decoder where the card has one) and the same
operators on the GPU, since DALI places an operator on the device of its input. Small per-sample
parameters (crop windows, coin flips, lighting alphas) are always computed on the CPU: DALI takes
argument inputs from host memory, and they are a few floats per image.

Epochs: a DALI reader shuffles inside a buffer and cannot be re-seeded, so each epoch builds a fresh
pipeline. Its tar order is a permutation drawn from (seed, epoch), the same on every rank so the
ranks' slices stay disjoint and change every epoch; its shuffle buffer and augmentation draws are
seeded from (seed, rank, epoch).

Resuming mid-epoch: training pipelines are built with DALI's checkpointing on, so
``loader.state_dict()`` holds ``pipe.checkpoint()`` (the reader's position, its shuffle buffer and every
random operator's state after the batches handed out so far) and ``load_state_dict()`` rebuilds the epoch's
pipeline from it: the resumed loader yields exactly the batches the uninterrupted one would have.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from shards.manifest import ShardError

from .config import (IMAGENET_MEAN_255, IMAGENET_STD_255, LIGHTING_STD, TEN_CROP_POSITIONS, LoaderConfig,
                     derive_seed, lighting_matrix_255)
from .loader import Loader, label_error
from .shardset import ShardSet

# NVIDIA's ImageNet settings for the nvJPEG decoder (DALI's ResNet-50 example): preallocate for the
# largest ImageNet image (6430 x 5980) so no batch reallocates mid-epoch, and give the A100-class
# hardware decoder 75 % of the images (github.com/NVIDIA/DALI/issues/5362). Unmeasured here: this machine has no GPU.
GPU_DECODER_SETTINGS = dict(
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
    hw_decoder_load=0.75,
)


def gpu_decoder_settings(cfg: LoaderConfig) -> dict:
    """GPU_DECODER_SETTINGS with ``cfg.hw_decoder_load`` when it is set."""
    if cfg.hw_decoder_load is None:
        return GPU_DECODER_SETTINGS
    return {**GPU_DECODER_SETTINGS, "hw_decoder_load": float(cfg.hw_decoder_load)}


_DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}


def _paper_window(jpegs, frac: float):
    """Section 4.1's crop as one window in the original image.

    "Shorter side to 256, centre 256x256, random 224x224" equals a random square of side
    s * 224/256 inside the central s x s square (s = the shorter side), resized to 224. Decoding
    only that window (ROI decoding) skips the pixels the crop throws away.
    Returns (x0, y0, side, width, height) as float DataNodes, whole pixels.
    """
    shape = fn.peek_image_shape(jpegs)                           # (H, W, C) before decoding
    h = fn.cast(shape[0], dtype=types.FLOAT)
    w = fn.cast(shape[1], dtype=types.FLOAT)
    s = dmath.min(h, w)
    side = dmath.max(dmath.floor(s * frac), 1.0)  # at least one pixel: a 1-pixel side floors to 0
    x0 = dmath.floor((w - s) * 0.5 + fn.random.uniform(range=[0.0, 1.0]) * (s - side))
    y0 = dmath.floor((h - s) * 0.5 + fn.random.uniform(range=[0.0, 1.0]) * (s - side))
    return x0, y0, side, w, h


def _lighting_mean(enabled: bool):
    """The paper's PCA lighting (section 4.1) folded into normalisation (see docs/pipeline.md).

    shift = V diag(lambda) alpha * 255 with alpha ~ N(0, 0.1)^3 drawn per image, and
    (x + shift - mean) / std == (x - (mean - shift)) / std, so the per-sample ``mean`` of
    crop_mirror_normalize carries it at no extra pass over the pixels (and, like the paper, without
    clipping at 0/255). Disabled, alpha has std 0: the graph keeps its shape, so the other
    operators' random streams, hence crops and flips, do not change with the flag.
    """
    alpha = fn.random.normal(shape=[3], stddev=LIGHTING_STD if enabled else 0.0)
    shift = fn.coord_transform(fn.reshape(alpha, shape=[1, 3]),
                               M=lighting_matrix_255().astype(np.float32).flatten().tolist())
    shift = fn.reshape(shift, shape=[3])
    return types.Constant(np.array(IMAGENET_MEAN_255, dtype=np.float32)) - shift, shift


def _graph(cfg: LoaderConfig, paths: list[str], index_paths: list[str], *, train: bool, seed: int,
           debug: bool, with_source: bool):
    jpegs, cls = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "cls"], missing_component_behavior="error",
        random_shuffle=train, initial_fill=cfg.shuffle_buffer, seed=seed,
        shard_id=cfg.rank, num_shards=cfg.world_size, stick_to_shard=True, name="reader")
    gpu = cfg.device_id is not None
    decode = dict(device="mixed" if gpu else "cpu", output_type=types.RGB,
                  **(gpu_decoder_settings(cfg) if gpu else {}))
    norm = dict(std=list(IMAGENET_STD_255), dtype=_DALI_DTYPES[cfg.dtype],
                output_layout="CHW" if cfg.layout == "NCHW" else "HWC")
    size = cfg.image_size
    extras = []
    if train:
        if cfg.crop == "paper":
            x0, y0, side, w, h = _paper_window(jpegs, cfg.crop_fraction)
            images = fn.decoders.image_slice(jpegs, fn.stack(x0, y0), fn.stack(side, side), axis_names="WH",
                                             normalized_anchor=False, normalized_shape=False, **decode)
            extras = [fn.stack(x0, y0, side, w, h)]
        else:
            images = fn.decoders.image_random_crop(jpegs, random_area=[0.08, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
                                                   **decode)
        images = fn.resize(images, size=[size, size], antialias=True)
        mirror = fn.random.coin_flip(probability=0.5 if cfg.flip else 0.0, dtype=types.INT32)
        mean, shift = _lighting_mean(cfg.use_lighting)
        images = fn.crop_mirror_normalize(images, mean=mean, mirror=mirror, **norm)
        extras += [mirror, shift]
    else:
        images = fn.decoders.image(jpegs, **decode)
        images = fn.resize(images, resize_shorter=cfg.resize_shorter, antialias=True)
        mean = list(IMAGENET_MEAN_255)
        if cfg.ten_crop:
            square = fn.crop(images, crop=(cfg.resize_shorter, cfg.resize_shorter))
            patches = [fn.crop_mirror_normalize(square, crop=(size, size), crop_pos_y=py, crop_pos_x=px,
                                                mirror=m, mean=mean, **norm)
                       for m in (0, 1) for py, px in TEN_CROP_POSITIONS]
            images = fn.stack(*patches, axis=0)
        else:
            images = fn.crop_mirror_normalize(images, crop=(size, size), mean=mean, **norm)
    outputs = [images, cls] + (extras if debug else [])
    if with_source:
        outputs.append(fn.get_property(jpegs, key="source_info"))
    return outputs


def build_pipeline(cfg: LoaderConfig, shardset: ShardSet, *, train: bool, epoch: int = 0,
                   debug: bool = False, with_source: bool = False, checkpoint: bytes | None = None) -> Pipeline:
    """The DALI graph for one epoch of ``cfg.rank``, built and ready to ``run()``.

    Outputs ``(images, cls_bytes)``; with ``debug`` also, for training, the paper window
    ``(x0, y0, side, W, H)`` (paper crop only), the mirror flag and the lighting shift (RGB, 0-255);
    with ``with_source`` last the sample's ``source_info`` (``/dir/x.tar:offset:name``).
    Training graphs trace their state (``pipe.checkpoint()``); ``checkpoint`` resumes from one.
    """
    shards = shardset.ordered(derive_seed(cfg.seed, epoch) if train else None)
    seed = derive_seed(cfg.seed, cfg.rank, epoch)
    pipe = Pipeline(batch_size=cfg.batch_size, num_threads=cfg.num_threads, device_id=cfg.device_id,
                    seed=seed, prefetch_queue_depth=cfg.prefetch, enable_checkpointing=train,
                    checkpoint=checkpoint)
    with pipe:
        pipe.set_outputs(*_graph(cfg, [s.tar for s in shards], [s.index for s in shards], train=train,
                                 seed=seed, debug=debug, with_source=with_source))
    try:
        pipe.build()
    except RuntimeError as e:
        if not _about_data(e):
            raise
        raise _shard_error(e, shardset) from None
    return pipe


def _about_data(exc: Exception) -> bool:
    """Whether a DALI error comes from reading or decoding the shards (not e.g. a missing GPU)."""
    text = str(exc)
    return any(op in text for op in ("readers.webdataset", "decoders.", "nvImageCodec", ".tar", ".idx"))


def _shard_error(exc: Exception, shardset: ShardSet, suspects: list[str] = ()) -> ShardError:
    """DALI's multi-line error (graph traceback, then "encountered:", the reason, C++ context),
    reduced to one line that names the shard it mentions, else the shards the failing batch was
    read from (a decoder error does not say which sample failed)."""
    text = str(exc)
    paths = re.findall(r"(/[^\s\"']+?\.(?:tar|idx))", text)
    where = next((shardset.shard_of(p) for p in paths), None)
    if where is None and suspects:
        where = ", ".join(suspects[:3]) + (f" (or one of {len(suspects) - 3} more)" if len(suspects) > 3 else "")
    where = where or shardset.root
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    reason = next((ln for ln in after if not ln.startswith(("C++ context", "Current pipeline"))), text.strip())
    return ShardError(f"{where}: DALI failed reading this split ({reason[:300]}); "
                      f"check it with `python -m shards verify {shardset.root}`")


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """Copy a dense DALI batch into a new torch tensor on ``device``."""
    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


def parse_labels(cls_batch) -> torch.Tensor:
    """The ``cls`` components (decimal ASCII, e.g. b"7") as an int64 tensor."""
    return torch.tensor([int(np.array(cls_batch[i]).tobytes()) for i in range(len(cls_batch))],
                        dtype=torch.int64)


def sample_keys(source_info) -> list[str]:
    """Sample keys (``__key__``) from DALI's ``source_info`` strings ``/dir/x.tar:offset:key.jpg``."""
    return [np.array(source_info[i]).tobytes().decode().rsplit(":", 1)[1].rsplit(".", 1)[0]
            for i in range(len(source_info))]


def finish_images(images: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """DALI hands out NCHW or NHWC bytes; give torch (B, [10,] C, H, W) in the asked memory format."""
    if cfg.layout == "NHWC":
        images = images.movedim(-1, -3)          # a view: logically CHW, channels-last in memory
    if cfg.dtype == "bfloat16":                  # DALI has no bfloat16; convert on the device
        images = images.to(torch.bfloat16)
    return images


class _DaliLoader(Loader):
    """Each epoch builds a fresh DALI pipeline; ``state_dict()`` adds its checkpoint under ``"dali"``."""

    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        self._pipe = None   # the live pipeline, while iterating

    def state_dict(self) -> dict:
        """Where the current epoch stands: ``{"epoch", "step", "dali"}`` (training loaders, mid-iteration)."""
        if self._pipe is None:
            raise RuntimeError("state_dict() is taken while iterating a training loader")
        return {**super().state_dict(), "dali": self._pipe.checkpoint()}

    def _batches(self):
        resume = self._take_resume()
        start = resume["step"] if resume else 0
        pipe = build_pipeline(self.cfg, self.shardset, train=self.train, epoch=self.epoch,
                              with_source=self.with_source, checkpoint=resume["dali"] if resume else None)
        self._pipe = pipe
        try:
            for step in range(start, self.steps):
                try:
                    images, cls, *source = pipe.run()
                except RuntimeError as e:
                    if not _about_data(e):
                        raise
                    raise _shard_error(e, self.shardset, self._suspects(step)) from None
                labels = parse_labels(cls)
                if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.shardset.classes):
                    raise self._label_error(labels, step)
                labels = labels.to(self.device, non_blocking=True)
                self._step = step + 1
                yield self._with_keys((finish_images(to_torch(images, self.device), self.cfg), labels),
                                      sample_keys(source[0]) if source else [])
        finally:
            self._pipe = None
            del pipe

    def _label_error(self, labels: torch.Tensor, step: int) -> ShardError:
        n = len(self.shardset.classes)
        bad = sorted({int(x) for x in labels if not 0 <= int(x) < n})
        where = ", ".join(self._suspects(step)[:3]) or self.shardset.root
        return label_error(where, "a sample", bad[0], n, self.shardset.root)

    def _suspects(self, step: int) -> list[str]:
        """The tars batch ``step`` can have come from: the reader has read at most the batches so far,
        the prefetched ones and the shuffle buffer of this rank's slice."""
        b = self.cfg.batch_size
        ahead = (self.cfg.prefetch * b + self.cfg.shuffle_buffer) if self.train else 0
        first = self.rank_start + (0 if self.train else step * b)
        last = self.rank_start + min(self.rank_samples, (step + 1) * b + ahead)
        order = self.shardset.ordered(derive_seed(self.cfg.seed, self.epoch) if self.train else None)
        return self.shardset.tars_covering(order, first, last)


class DaliTrainLoader(_DaliLoader):
    """``len(loader)`` full batches of ``(images, labels)`` per epoch, identical on every rank."""
    train = True

    def __iter__(self):
        return self._batches()


class DaliEvalLoader(_DaliLoader):
    """``(images, labels, mask)``: the rank's slice in stored order, padded to ``len(loader)``
    batches on every rank; ``mask`` is False on the padding rows."""
    train = False

    def __iter__(self):
        for step, (images, labels, *keys) in enumerate(self._batches()):
            yield (images, labels, self._mask(step), *keys)
