"""The loader configuration (docs/design.md section 2) and the paper's constants.

Both loaders (DALI in :mod:`pipeline.dali`, Pillow in :mod:`pipeline.reference`) take the same
:class:`LoaderConfig`; it is validated when it is created so a typo fails before any shard is opened.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass

import numpy as np

# ImageNet RGB mean and standard deviation on the 0-255 scale (torchvision's figures x 255).
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# How pixels reach the network: "mean" subtracts the mean only and keeps the 0-255 scale (the paper, section
# 2: centred raw RGB values, the scale its N(0, 0.01) init, unit biases and LRN constants were chosen for);
# "standard" also divides by the std (about 58), torchvision's convention.
NORMALIZATIONS = ("mean", "standard")

# PCA of ImageNet RGB values on the 0-1 scale (from fb.resnet.torch; the paper, section 4.1).
# Columns of PCA_EIGVEC are the eigenvectors p_i, PCA_EIGVAL the eigenvalues lambda_i.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])
# The paper's alpha_i ~ N(0, 0.1).
LIGHTING_STD = 0.1
# The paper's ten test patches: these five (y, x) positions (TL TR BL BR C), then the same mirrored.
TEN_CROP_POSITIONS = ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.5, 0.5))


def lighting_matrix_255() -> np.ndarray:
    """M with shift = M @ alpha on the 0-255 pixel scale: M = V diag(lambda) * 255.

    The paper adds sum_i p_i alpha_i lambda_i to every pixel; our pixels are 0-255, the
    eigen-figures are for 0-1, hence the factor 255.
    """
    return PCA_EIGVEC * PCA_EIGVAL[None, :] * 255.0


def lighting_covariance_255(alpha_std: float = LIGHTING_STD) -> np.ndarray:
    """The covariance of the per-image RGB shift: V diag(lambda^2 sigma^2) V^T, 0-255 scale."""
    m = lighting_matrix_255()
    return (m * alpha_std ** 2) @ m.T


def divisor_255(normalize: str) -> tuple[float, float, float]:
    """What each channel is divided by after the mean is subtracted: the std for "standard", 1 for "mean"."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: choose one of {NORMALIZATIONS}")
    return IMAGENET_STD_255 if normalize == "standard" else (1.0, 1.0, 1.0)


CROPS = ("paper", "rrc")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LoaderConfig:
    """Everything a train or eval loader needs; identical for the DALI and the reference loader.

    ``batch_size`` is per rank. ``device`` is ``"cpu"`` or ``"cuda:N"`` (the device Ray assigned):
    the DALI graph runs its operators there and the batches arrive there. ``lighting=None`` means the
    paper's default: on for ``crop="paper"``, off for ``crop="rrc"``. ``layout="NHWC"`` gives the same
    logical (B, C, H, W) tensor in ``torch.channels_last`` memory format. ``normalize``: ``"mean"``
    (x - mean, 0-255 scale: the paper) or ``"standard"`` ((x - mean) / std).
    """

    shard_dir: str
    batch_size: int = 128
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    seed: int = 0
    crop: str = "paper"            # "paper" (256 -> random 224) or "rrc" (random-resized-crop)
    lighting: bool | None = None   # PCA lighting; None = on for "paper", off for "rrc"
    flip: bool = True
    normalize: str = "standard"    # "mean" (the paper: x - mean, 0-255 scale) or "standard" ((x - mean) / std)
    image_size: int = 224
    resize_shorter: int = 256
    layout: str = "NCHW"
    dtype: str = "float32"
    num_threads: int = 2           # DALI CPU threads
    ten_crop: bool = False         # eval only: the paper's 10 patches per image
    shuffle_buffer: int = 1024     # samples in the shuffle buffer (DALI's initial_fill)
    num_workers: int = 2           # reference loader: torch DataLoader worker processes
    prefetch: int = 2              # DALI prefetch_queue_depth
    # GPU graphs only: the share of images nvJPEG gives the hardware JPEG decoder (0-1); None keeps
    # GPU_DECODER_SETTINGS' value (pipeline/dali_loader.py). CPU graphs ignore it.
    hw_decoder_load: float | None = None
    # training: the samples one optimizer step takes from the whole group; 0 = batch_size * world_size. A
    # multiple of batch_size, at least world_size batches: ranks then compute an uneven number of batches (the
    # micro-batches of gradient accumulation, shardset.micro_range) and read shares in proportion
    global_batch: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"LoaderConfig.{field}={getattr(self, field)!r}: {why}")

        if not isinstance(self.shard_dir, (str, os.PathLike)) or not str(self.shard_dir):
            bad("shard_dir", "give the shard directory written by `python -m shards build`")
        object.__setattr__(self, "shard_dir", str(self.shard_dir))
        for field in ("batch_size", "world_size", "image_size", "resize_shorter", "num_threads",
                      "shuffle_buffer", "prefetch"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                bad(field, "must be a positive integer")
        if not isinstance(self.global_batch, int) or self.global_batch < 0 or (self.global_batch and (
                self.global_batch % self.batch_size or self.global_batch < self.batch_size * self.world_size)):
            bad("global_batch", f"must be 0 (batch_size * world_size) or a multiple of batch_size={self.batch_size} "
                                f"of at least world_size={self.world_size} batches")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            bad("num_workers", "must be 0 (load in the main process) or more")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            bad("rank", f"must be in [0, world_size={self.world_size})")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "must be a non-negative integer")
        if self.crop not in CROPS:
            bad("crop", f"choose one of {CROPS}")
        if self.normalize not in NORMALIZATIONS:
            bad("normalize", f"choose one of {NORMALIZATIONS}")
        if self.layout not in LAYOUTS:
            bad("layout", f"choose one of {LAYOUTS}")
        if self.dtype not in DTYPES:
            bad("dtype", f"choose one of {DTYPES}")
        if self.image_size > self.resize_shorter:
            bad("image_size", f"must not exceed resize_shorter={self.resize_shorter} (crops are taken "
                              "from the resized image)")
        if self.device != "cpu":
            head, _, index = self.device.partition(":")
            if head != "cuda" or not index.isdigit():
                bad("device", 'use "cpu" or "cuda:N" (e.g. the device Ray Train assigned: '
                              'f"cuda:{torch.cuda.current_device()}")')
        if self.lighting is not None and not isinstance(self.lighting, bool):
            bad("lighting", "must be True, False or None (paper default)")
        if self.hw_decoder_load is not None and (isinstance(self.hw_decoder_load, bool) or not isinstance(
                self.hw_decoder_load, (int, float)) or not 0 <= self.hw_decoder_load <= 1):
            bad("hw_decoder_load", "must be a number in [0, 1] or None (NVIDIA's default)")

    # --- derived values -------------------------------------------------------------------------
    @property
    def use_lighting(self) -> bool:
        return self.crop == "paper" if self.lighting is None else self.lighting

    @property
    def std_255(self) -> tuple[float, float, float]:
        """Per-channel divisor after subtracting the mean (0-255 scale): the std, or 1 for ``normalize="mean"``."""
        return divisor_255(self.normalize)

    @property
    def device_id(self) -> int | None:
        """DALI's device_id: None for a CPU-only graph, N for ``cuda:N``."""
        return None if self.device == "cpu" else int(self.device.split(":")[1])

    @property
    def crop_fraction(self) -> float:
        """The random crop's side as a fraction of the resized shorter side (224/256 in the paper)."""
        return self.image_size / self.resize_shorter

    @property
    def units(self) -> int:
        """Batches of ``batch_size`` in one global step, over all ranks (``world_size`` unless ``global_batch``)."""
        return self.global_batch // self.batch_size if self.global_batch else self.world_size

    def replace(self, **changes) -> "LoaderConfig":
        return dataclasses.replace(self, **changes)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from (seed, rank, epoch, ...): stable across processes and Python versions."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
