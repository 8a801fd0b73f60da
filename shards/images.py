"""One source file -> the JPEG bytes a shard stores, or the reason it is rejected.

Default is copy mode: an RGB JPEG keeps its bytes unchanged. Anything else that Pillow can decode
(CMYK or greyscale JPEG, a PNG named ``.JPEG``, a 16-bit PNG, ...) is re-encoded as an RGB JPEG. Images
with a side under :data:`MIN_SIDE` pixels (stored size) are rejected: the loaders' crops need room. With
``resize_shorter`` / ``max_side`` images larger than the target are downscaled and re-encoded; images
already small enough keep their bytes (no second generation of JPEG loss).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Smallest side an image may have to be kept. Every loader crop must find a window of at least one pixel
# (the paper crop takes floor(side * 224/256)), and an 8-pixel side is also the smallest --resize-shorter.
MIN_SIDE = 8
# Larger images are rejected before decoding: a small file can claim a huge size (a decompression bomb).
MAX_PIXELS = 178_956_970  # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS), enforced without its warning


class Rejected(Exception):
    """The file cannot become a sample; ``str(e)`` is the reason written to rejected.jsonl."""


@dataclass(frozen=True)
class EncodeConfig:
    resize_shorter: int | None = None
    max_side: int | None = None
    quality: int = 90

    def __post_init__(self):
        for name in ("resize_shorter", "max_side"):
            v = getattr(self, name)
            if v is not None and v < 8:
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be at least 8 pixels")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality {self.quality}: must be between 1 and 100")

    @property
    def resizes(self) -> bool:
        return self.resize_shorter is not None or self.max_side is not None


def target_size(width: int, height: int, cfg: EncodeConfig) -> tuple[int, int]:
    """The stored size: downscale only, so the shorter side <= resize_shorter and the longer <= max_side."""
    scale = 1.0
    if cfg.resize_shorter is not None:
        scale = min(scale, cfg.resize_shorter / min(width, height))
    if cfg.max_side is not None:
        scale = min(scale, cfg.max_side / max(width, height))
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_8bit(img: Image.Image) -> Image.Image:
    """A greyscale image of 16-bit or 32-bit integers, or of floats, as 8-bit ``L``, scaled not clipped.

    Pillow's own conversion clips (a 16-bit PNG comes out nearly white). Integer modes hold 16-bit
    samples (PNG, TIFF): 0..65535 -> 0..255. Float images in 0..1 are scaled by 255; other float
    ranges are taken as 0..255. Out-of-range values are clipped.
    """
    a = np.asarray(img, dtype=np.float32)
    if img.mode == "F":
        top = 1.0 if np.nanmax(a, initial=0.0) <= 1.0 else 255.0
    else:
        top = 65535.0
    a = np.nan_to_num(a, nan=0.0, posinf=top, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = to_8bit(img)
    return img.convert("RGB")


def prepare_image(data: bytes, cfg: EncodeConfig) -> tuple[bytes, int, int]:
    """Return ``(jpeg_bytes, width, height)`` for a shard, or raise :class:`Rejected`."""
    if not data:
        raise Rejected("zero-byte file")
    with warnings.catch_warnings():
        # ImageNet has JPEGs with broken EXIF blocks; the pixels are fine, the warnings are noise.
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Rejected("not an image Pillow can read") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a reject, never a crash
            raise Rejected(f"unreadable image header: {type(e).__name__}: {e}") from None
        fmt, (width, height) = img.format, img.size
        if min(width, height) < MIN_SIDE:
            raise Rejected(f"too small: {width}x{height} (the minimum side is {MIN_SIDE} px)")
        if width * height > MAX_PIXELS:
            raise Rejected(f"too large: {width}x{height} pixels (at most {MAX_PIXELS})")
        out_w, out_h = target_size(width, height, cfg)
        if min(out_w, out_h) < MIN_SIDE:
            raise Rejected(f"too small once downscaled: {width}x{height} -> {out_w}x{out_h} by --max-side "
                           f"(the minimum side is {MIN_SIDE} px)")
        keep = fmt == "JPEG" and img.mode == "RGB" and (out_w, out_h) == (width, height)
        if keep:
            # The bytes are kept, the decode only proves them sound: at 1/8 scale libjpeg still reads
            # every entropy-coded block (so truncation and corruption still fail) but skips most IDCT work.
            img.draft("RGB", ((width + 7) // 8, (height + 7) // 8))
        elif (out_w, out_h) != (width, height) and fmt == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target: much faster.
            img.draft("RGB", (out_w, out_h))
        try:
            img.load()  # full decode: catches truncated and corrupt files
        except Exception as e:  # noqa: BLE001
            raise Rejected(f"truncated or corrupt {fmt or 'image'} data: {e}") from None
        if keep:
            return data, width, height
        try:
            if img.mode != "RGB":
                img = to_rgb(img)
            if img.size != (out_w, out_h):
                img = img.resize((out_w, out_h), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=cfg.quality)
        except Exception as e:  # noqa: BLE001
            raise Rejected(f"cannot convert {fmt} {img.mode} image to RGB JPEG: {e}") from None
        return buf.getvalue(), out_w, out_h

