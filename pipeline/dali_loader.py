"""The DALI input pipeline: WebDataset shards -> decoded, augmented, normalised batches.

:func:`build_pipeline` is the one function that builds the graph. ``cfg.device`` picks where it runs:
``"cpu"`` gives ``device_id=None`` and CPU operators; ``"cuda:N"`` gives ``device_id=N``, nvJPEG
decoding (``device="mixed"``, with the hardware decoder where the card has one) and the same
operators on the GPU, since DALI places an operator on the device of its input. Small per-sample
parameters (crop windows, coin flips, lighting alphas) are always computed on the CPU: DALI takes
argument inputs from host memory, and they are a few floats per image.

Epochs: a DALI reader shuffles inside a buffer and cannot be re-seeded, so each epoch builds a fresh
pipeline; a training loader builds the next epoch's in a background thread as soon as the current epoch's
last batch is read, so the device is fed across the boundary. Its tar order is a permutation drawn from (seed, epoch), the same on every rank so the
ranks' slices stay disjoint and change every epoch; its shuffle buffer and augmentation draws are
seeded from (seed, rank, epoch).

Resuming mid-epoch: training pipelines are built with DALI's checkpointing on, so
``loader.state_dict()`` holds ``pipe.checkpoint()`` (the reader's position, its shuffle buffer and every
random operator's state after the batches handed out so far) and ``load_state_dict()`` rebuilds the epoch's
pipeline from it: the resumed loader yields exactly the batches the uninterrupted one would have.
``load_position()`` (a position taken by a group of another size) instead builds a reader over the samples
the epoch has not consumed: the same tars, with index files that list only the rank's share of those samples
(pipeline/shardset.py ``write_index``), so DALI still reads straight from the tars.
"""
from __future__ import annotations

import ctypes
import re
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import Pipeline

from shards.manifest import ShardError

from .config import (IMAGENET_MEAN_255, LIGHTING_STD, TEN_CROP_POSITIONS, LoaderConfig, derive_seed,
                     lighting_matrix_255)
from .loader import Loader, label_error
from .shardset import Part, ShardSet, jpg_offsets, write_index

# nvJPEG settings for GPU graphs. DALI's default memory paddings (16 MB device, 8 MB pinned host per
# decoder thread) replace NVIDIA's full-ImageNet 200 MB / 134 MB: those are paid per thread and per epoch
# (each epoch builds a new decoder) and nothing here has measured a gain from them. The preallocation hints
# come from the split's own largest stored image (manifest.json's max_width / max_height), not ImageNet's
# 5980 x 6430. The hardware decoder (A100-class) gets 75 % of the images (github.com/NVIDIA/DALI/issues/5362).
# jpeg_fancy_upsampling: the mixed decoder upsamples chroma like libjpeg-turbo (the CPU decoder's and
# Pillow's way), so GPU pixels meet the same tolerance against the reference loader as CPU pixels.
GPU_DECODER_SETTINGS = dict(hw_decoder_load=0.75, jpeg_fancy_upsampling=True)


def gpu_decoder_settings(cfg: LoaderConfig, max_size: tuple[int, int] | None = None) -> dict:
    """GPU_DECODER_SETTINGS with ``cfg.hw_decoder_load`` when it is set and, given the split's largest
    stored ``(width, height)``, nvJPEG's preallocation sized for it."""
    settings = dict(GPU_DECODER_SETTINGS)
    if cfg.hw_decoder_load is not None:
        settings["hw_decoder_load"] = float(cfg.hw_decoder_load)
    if max_size is not None:
        settings["preallocate_width_hint"], settings["preallocate_height_hint"] = max_size
    return settings


# EXIF orientation is ignored everywhere (decoders and peek_image_shape alike), as torchvision's PIL loader
# and the reference loader do: copy-mode shards keep the tag, and a loader that rotated would crop and
# show other pixels for the same sample.
ORIENTATION = dict(adjust_orientation=False)


_DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}


def _paper_window(jpegs, frac: float):
    """Section 4.1's crop as one window in the original image.

    "Shorter side to 256, centre 256x256, random 224x224" equals a random square of side
    s * 224/256 inside the central s x s square (s = the shorter side), resized to 224. Decoding
    only that window (ROI decoding) skips the pixels the crop throws away.
    Returns (x0, y0, side, width, height) as float DataNodes, whole pixels.
    """
    shape = fn.peek_image_shape(jpegs, **ORIENTATION)            # (H, W, C) before decoding
    h = fn.cast(shape[0], dtype=types.FLOAT)
    w = fn.cast(shape[1], dtype=types.FLOAT)
    s = dmath.min(h, w)
    side = dmath.max(dmath.floor(s * frac), 1.0)  # at least one pixel: a 1-pixel side floors to 0
    return _offset(w, s, side), _offset(h, s, side), side, w, h


def _offset(length, s, side):
    """floor((length - s) / 2) + k, k uniform over the s - side + 1 whole-pixel positions (33 for 224 of 256):
    ``u * (s - side)`` with u in [0, 1) never draws the last one. The min guards u * n rounding up to n
    in float32."""
    slack = s - side
    k = dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (slack + 1.0)), slack)
    return dmath.floor((length - s) * 0.5) + k


def _lighting_mean(enabled: bool):
    """The paper's PCA lighting (section 4.1) folded into normalisation (see docs/pipeline.md).

    shift = V diag(lambda) alpha * 255 with alpha ~ N(0, 0.1)^3 drawn per image, and
    (x + shift - mean) / std == (x - (mean - shift)) / std (std = 1 for ``normalize="mean"``), so the per-sample ``mean`` of
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
           debug: bool, with_source: bool, max_size: tuple[int, int] | None = None, split: bool = True):
    """``split``: DALI's reader takes the rank's slice of ``paths`` (shard_id / num_shards); else it reads
    all of them (index files that already list only the rank's samples)."""
    jpegs, cls = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "cls"], missing_component_behavior="error",
        random_shuffle=train, initial_fill=cfg.shuffle_buffer, seed=seed,
        shard_id=cfg.rank if split else 0, num_shards=cfg.world_size if split else 1, stick_to_shard=True,
        name="reader")
    gpu = cfg.device_id is not None
    decode = dict(device="mixed" if gpu else "cpu", output_type=types.RGB, **ORIENTATION,
                  **(gpu_decoder_settings(cfg, max_size) if gpu else {}))
    # std: the ImageNet std ("standard") or 1 ("mean": the paper's centred 0-255 values); same kernel either way
    norm = dict(std=list(cfg.std_255), dtype=_DALI_DTYPES[cfg.dtype],
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
                   debug: bool = False, with_source: bool = False, checkpoint: bytes | None = None,
                   parts: list[Part] | None = None, seed_parts: tuple[int, ...] | None = None) -> Pipeline:
    """The DALI graph for one epoch of ``cfg.rank``, built and ready to ``run()``.

    Outputs ``(images, cls_bytes)``; with ``debug`` also, for training, the paper window
    ``(x0, y0, side, W, H)`` (paper crop only), the mirror flag and the lighting shift (RGB, 0-255);
    with ``with_source`` last the sample's ``source_info`` (``/dir/x.tar:offset:name``).
    Training graphs trace their state (``pipe.checkpoint()``); ``checkpoint`` resumes from one.
    ``parts``: read exactly these samples, in this order (else the rank's slice of the epoch's tar order);
    ``seed_parts``: what the random streams are seeded from (default ``(seed, rank, epoch)``).
    """
    seed = derive_seed(*(seed_parts or (cfg.seed, cfg.rank, epoch)))
    # exec_dynamic (DALI's default, named here because to_torch relies on it): outputs are reference-counted
    # buffers that later iterations do not overwrite
    pipe = Pipeline(batch_size=cfg.batch_size, num_threads=cfg.num_threads, device_id=cfg.device_id,
                    seed=seed, prefetch_queue_depth=cfg.prefetch, enable_checkpointing=train,
                    checkpoint=checkpoint, exec_dynamic=True)
    with tempfile.TemporaryDirectory(prefix="dali-index-") as tmp:   # DALI parses index files while building
        if parts is None:
            shards = shardset.ordered(derive_seed(cfg.seed, epoch) if train else None)
            paths, index_paths = [s.tar for s in shards], [s.index for s in shards]
        else:
            paths, index_paths = [p.shard.tar for p in parts], []
            for k, part in enumerate(parts):
                if part.whole:
                    index_paths.append(part.shard.index)
                else:
                    index_paths.append(str(Path(tmp) / f"{k}.idx"))
                    write_index(part, index_paths[-1])
        with pipe:
            pipe.set_outputs(*_graph(cfg, paths, index_paths, train=train, seed=seed, debug=debug,
                                     with_source=with_source, max_size=shardset.max_size, split=parts is None))
        try:
            pipe.build()
        except RuntimeError as e:
            if not _about_data(e):
                raise
            raise _shard_error(e, shardset) from None
    return pipe


# What makes a DALI error the data's fault: DALI's own words (after "encountered:") name a tar or an index
# (reader errors, a decoder's "Failed to decode sample #3 : /d/x.tar:1536:key.jpg"), a sample, or
# nvImageCodec rejects the bytes themselves (status 3 BAD_CODESTREAM, 4 CODESTREAM_UNSUPPORTED). Anything
# else (a GPU out of memory, nvJPEG failing to start, a CUDA error) is raised as DALI said it.
_DATA_PATH = re.compile(r"/[^\s\"']+?\.(?:tar|idx)\b")
_DATA_WORDS = re.compile(r"\bsample\s*#?\d+|nvImageCodec failure: '#[34]'", re.IGNORECASE)


def _dali_reason(text: str) -> str:
    """The part of a DALI error after "encountered:": the graph traceback before it quotes our own source."""
    head, sep, tail = text.partition("encountered:")
    return tail if sep else text


def _about_data(exc: Exception) -> bool:
    """Whether a DALI error is about the shards (see _DATA_PATH, _DATA_WORDS), not e.g. the GPU."""
    reason = _dali_reason(str(exc))
    return bool(_DATA_PATH.search(reason) or _DATA_WORDS.search(reason))


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
    """A dense DALI batch as a torch tensor on ``device``, without a copy (DLPack), as DALI's own iterator
    does under the dynamic executor: its outputs are reference-counted, so the tensor keeps the buffer
    alive past the next ``run()`` and past the pipeline itself."""
    dense = tensor_list.as_tensor()
    if device.type == "cuda":
        with torch.cuda.device(device):   # DLPack syncs DALI's stream with this device's current stream
            return torch.from_dlpack(dense)
    return torch.from_dlpack(dense)


def _flat(tensor_list) -> tuple[np.ndarray, np.ndarray]:
    """A CPU batch of 1-D byte samples as one uint8 array (one copy in C++, no per-sample Python) and each
    sample's end offset in it. Per-sample ``np.array(batch[i])`` costs about 1 ms per 256 samples and per
    output, on the main thread that also feeds the device."""
    lengths = np.fromiter((shape[0] for shape in tensor_list.shape()), dtype=np.int64, count=len(tensor_list))
    data = np.empty(int(lengths.sum()), dtype=np.uint8)
    if data.size:
        tensor_list.copy_to_external(ctypes.c_void_p(data.ctypes.data))
    return data, np.cumsum(lengths)


def _strings(tensor_list) -> list[str]:
    """Each sample of a CPU batch of UTF-8 byte strings (e.g. ``source_info``) as a ``str``."""
    data, ends = _flat(tensor_list)
    raw = data.tobytes()
    return [raw[a:b].decode() for a, b in zip(np.concatenate(([0], ends[:-1])).tolist(), ends.tolist())]


def parse_labels(cls_batch) -> torch.Tensor:
    """The ``cls`` components (decimal ASCII, e.g. b"7") as an int64 tensor: all digits at once; anything else
    (a sign, spaces, an empty or over-long field) takes ``int()`` per sample, with ``int()``'s result or error."""
    data, ends = _flat(cls_batch)
    lengths = np.diff(ends, prepend=0)
    if len(lengths) and 1 <= lengths.min() and lengths.max() <= 18 and not (data - 48 > 9).any():
        width = int(lengths.max())
        digits = np.zeros((len(lengths), width), dtype=np.int64)
        digits[np.arange(width) >= width - lengths[:, None]] = data - 48   # right-aligned, in sample order
        return torch.from_numpy(digits @ 10 ** np.arange(width - 1, -1, -1, dtype=np.int64))
    raw = data.tobytes()
    return torch.tensor([int(raw[a:b]) for a, b in zip((ends - lengths).tolist(), ends.tolist())], dtype=torch.int64)


def sample_keys(source_info) -> list[str]:
    """Sample keys (``__key__``) from DALI's ``source_info`` strings ``/dir/x.tar:offset:key.jpg``."""
    return [info.rsplit(":", 1)[1].rsplit(".", 1)[0] for info in _strings(source_info)]


def finish_images(images: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """DALI hands out NCHW or NHWC bytes; give torch (B, [10,] C, H, W) in the asked memory format."""
    if cfg.layout == "NHWC":
        images = images.movedim(-1, -3)          # a view: logically CHW, channels-last in memory
    if cfg.dtype == "bfloat16":                  # DALI has no bfloat16; convert on the device
        images = images.to(torch.bfloat16)
    return images


class _Ahead:
    """The next epoch's pipeline, built (index parsing, decoder set-up) and started (shuffle buffer fill,
    prefetch) in a background thread while the current epoch's last batch trains."""

    def __init__(self, key: tuple, build):
        self.key, self.pipe = key, None
        # not a daemon: the interpreter waits for it at exit instead of tearing DALI down mid-build
        self._thread = threading.Thread(target=self._run, args=(build,), name="dali-next-epoch")
        self._thread.start()

    def _run(self, build) -> None:
        try:
            pipe = build()
            pipe.schedule_run()          # the first batches start on DALI's own threads
            self.pipe = pipe
        except Exception:                # the foreground build repeats it and reports the error
            self.pipe = None

    def take(self):
        """The started pipeline, or None when building it failed."""
        self._thread.join()
        return self.pipe


class _DaliLoader(Loader):
    """Each epoch builds a fresh DALI pipeline; ``state_dict()`` adds its checkpoint under ``"dali"``."""

    build_ahead = False   # build the next epoch's pipeline while the last batch of this one trains
    # GPU graphs: bind each batch to torch's current stream (DALI's outputs(cuda_stream=...)) instead of waiting
    # on the host for DALI's GPU work; off until a GPU measures it (bench/gpu_check.py, step c)
    outputs_to_stream = False

    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        self._pipe = None    # the live pipeline, while iterating
        self._ahead = None   # _Ahead for the next epoch, once this one's last batch is read

    def state_dict(self) -> dict:
        """Where the current epoch stands: ``{"epoch", "step", "dali"}`` (training loaders, mid-iteration; once
        the epoch is over, without ``"dali"``)."""
        if self._pipe is None:
            if self.train and self._step >= self.steps:
                return super().state_dict()
            raise RuntimeError("state_dict() is taken while iterating a training loader")
        return {**super().state_dict(), "dali": self._pipe.checkpoint()}

    def _build(self, epoch: int, base: np.ndarray | None = None, checkpoint: bytes | None = None):
        """Epoch ``epoch``'s pipeline; training pipelines read past ``base`` (the samples already consumed) and
        always name their samples (``source_info``), which the loader marks as consumed."""
        parts = self._parts(epoch, base) if self.train else None
        return build_pipeline(self.cfg, self.shardset, train=self.train, epoch=epoch,
                              with_source=self.with_source or self.train, checkpoint=checkpoint, parts=parts,
                              seed_parts=self._seed_parts(epoch, base))

    def _numbers(self, source_info) -> np.ndarray:
        """The split-wide sample numbers of a batch, from DALI's ``source_info`` (``/dir/x.tar:offset:key.jpg``):
        one ``searchsorted`` per tar in the batch, not per sample."""
        tars, offsets = [], []
        for info in _strings(source_info):
            tar, offset, _ = info.rsplit(":", 2)
            tars.append(tar)
            offsets.append(int(offset))
        offsets = np.asarray(offsets, dtype=np.int64)
        out = np.empty(len(tars), dtype=np.int64)
        names, which = np.unique(np.asarray(tars), return_inverse=True)
        for k, tar in enumerate(names.tolist()):
            rows = which == k
            shard = self._by_tar[tar]
            out[rows] = shard.first + np.searchsorted(jpg_offsets(shard.index), offsets[rows])
        return out

    def _start(self, resume: dict | None):
        """This epoch's pipeline and whether its first batch is already scheduled: the one built ahead
        when it is for this epoch (not a resume), else a new one."""
        ahead, self._ahead = self._ahead, None
        pipe = ahead.take() if ahead is not None else None
        if pipe is not None and resume is None and ahead.key == (self.epoch, self.with_source):
            return pipe, True
        del pipe
        return self._build(self.epoch, self._base, resume.get("dali") if resume else None), False

    def _batches(self):
        resume = self._take_resume()
        start = self._begin(resume)
        if start >= self.steps:
            return
        pipe, scheduled = self._start(resume)
        self._pipe = pipe
        # run() is schedule_run() + outputs() (DALI refuses mixing the two). The first schedule_run()
        # queues `depth` iterations, each later one the iteration `depth - 1` steps ahead: from step
        # steps - depth on, everything the epoch needs is queued, so no more are scheduled and the next
        # epoch's pipeline is built meanwhile.
        last_needed = max(start, self.steps - self.cfg.prefetch)
        try:
            for step in range(start, self.steps):
                try:
                    if not scheduled and (step == start or step <= last_needed):
                        pipe.schedule_run()
                    scheduled = False
                    images, cls, *source = pipe.outputs(self._consumer_stream())
                except RuntimeError as e:
                    if not _about_data(e):
                        raise
                    raise _shard_error(e, self.shardset, self._suspects(step)) from None
                if step == last_needed and self.build_ahead:
                    epoch = self.epoch + 1
                    self._ahead = _Ahead((epoch, self.with_source), lambda: self._build(epoch))
                labels = parse_labels(cls)
                if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.shardset.classes):
                    raise self._label_error(labels, step)
                if self.device.type == "cuda":
                    # from pageable memory CUDA syncs the stream before the copy (host waits for the queued
                    # training step); pinned, the copy is queued and the host runs on
                    labels = labels.pin_memory()
                labels = labels.to(self.device, non_blocking=True)
                if self.train:
                    self._mark(self._numbers(source[0]))
                self._step = step + 1
                yield self._with_keys((finish_images(to_torch(images, self.device), self.cfg), labels),
                                      sample_keys(source[0]) if self.with_source else [])
        finally:
            self._pipe = None
            del pipe

    def _consumer_stream(self):
        """The stream DALI binds a batch to (None: DALI waits for it on the host; the CPU: always None)."""
        if self.outputs_to_stream and self.device.type == "cuda":
            return torch.cuda.current_stream(self.device)
        return None

    def _label_error(self, labels: torch.Tensor, step: int) -> ShardError:
        n = len(self.shardset.classes)
        bad = sorted({int(x) for x in labels if not 0 <= int(x) < n})
        where = ", ".join(self._suspects(step)[:3]) or self.shardset.root
        return label_error(where, "a sample", bad[0], n, self.shardset.root)

    def _suspects(self, step: int) -> list[str]:
        """The tars batch ``step`` can have come from: the reader has read at most the batches so far,
        the prefetched ones and the shuffle buffer of this rank's slice."""
        if self.train and (self._base is not None or self.cfg.units != self.cfg.world_size):
            return [p.shard.tar for p in self._parts(self.epoch, self._base)]
        b = self.cfg.batch_size
        ahead = (self.cfg.prefetch * b + self.cfg.shuffle_buffer) if self.train else 0
        first = self.rank_start + (0 if self.train else step * b)
        last = self.rank_start + min(self.rank_samples, (step + 1) * b + ahead)
        order = self.shardset.ordered(derive_seed(self.cfg.seed, self.epoch) if self.train else None)
        return self.shardset.tars_covering(order, first, last)


class DaliTrainLoader(_DaliLoader):
    """``len(loader)`` full batches of ``(images, labels)`` per epoch, identical on every rank; epoch
    ``e + 1``'s pipeline is built while ``e``'s last batch trains (``build_ahead``)."""
    train = True
    build_ahead = True

    def __iter__(self):
        return self._batches()


class DaliEvalLoader(_DaliLoader):
    """``(images, labels, mask)``: the rank's slice in stored order, padded to ``len(loader)``
    batches on every rank; ``mask`` is False on the padding rows."""
    train = False

    def __iter__(self):
        for step, (images, labels, *keys) in enumerate(self._batches()):
            yield (images, labels, self._mask(step), *keys)
