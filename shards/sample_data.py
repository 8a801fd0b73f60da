"""Real image sets that ship inside PyPI packages, written out as the sharder's input layouts.

Nothing here downloads anything: scikit-learn carries the 1,797 handwritten digits (8x8 scans of
43 people's handwriting) and scikit-image / scikit-learn carry a dozen photographs. The demo trains on
the digits; the tests build ImageNet-style trees from the photographs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def export_digits(out_root: str | os.PathLike, size: int = 64, val_fraction: float = 0.2,
                  seed: int = 0, quality: int = 95) -> dict[str, int]:
    """Write scikit-learn's digits as class-folder trees ``out_root/{train,val}/digit_<d>/<i>.jpg``.

    Each 8x8 scan (values 0..16) is scaled to 0..255, upscaled to ``size`` x ``size`` with bicubic
    resampling and saved as an RGB JPEG. The split is stratified and fixed by ``seed``.
    Returns the number of images written per split.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    out_root = Path(out_root)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, members in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = out_root / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in members:
                pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC)
                img.convert("RGB").save(folder / f"{i:04d}.jpg", quality=quality)
                counts[split] += 1
    return counts


def photographs() -> dict[str, np.ndarray]:
    """The colour photographs that ship with scikit-image and scikit-learn, as HxWx3 uint8 arrays."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
                 "retina", "immunohistochemistry", "colorwheel"):
        fn = getattr(skimage.data, name, None)
        if fn is None:
            continue
        try:
            arr = np.asarray(fn())
        except Exception:  # a data file not shipped in this scikit-image build
            continue
        if arr.ndim == 3 and arr.shape[2] >= 3:
            out[name] = np.ascontiguousarray(arr[..., :3]).astype(np.uint8)
    sample = load_sample_images()
    for fname, arr in zip(sample.filenames, sample.images):
        out[Path(fname).stem] = np.asarray(arr, dtype=np.uint8)
    return out


# Real ImageNet wnids and their names, for trees that look like ILSVRC-2012's.
IMAGENET_WNIDS = {
    "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus",
    "n01484850": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    "n01491361": "tiger shark, Galeocerdo cuvieri",
    "n01494475": "hammerhead, hammerhead shark",
    "n02123045": "tabby, tabby cat",
    "n03792782": "mountain bike, all-terrain bike, off-roader",
    "n04266014": "space shuttle",
}


def photo_crops(per_class: int, n_classes: int, seed: int = 0,
                min_side: int = 80, max_side: int = 320) -> list[tuple[str, np.ndarray]]:
    """Distinct real images: random crops of the shipped photographs, one photograph per class.

    Returns ``[(wnid, HxWx3 uint8), ...]`` with ``per_class`` images for each of the first
    ``n_classes`` wnids of :data:`IMAGENET_WNIDS`. Sizes vary so resizing paths are exercised.
    """
    photos = list(photographs().values())
    wnids = sorted(IMAGENET_WNIDS)[:n_classes]
    if n_classes > len(photos) or n_classes > len(wnids):
        raise ValueError(f"at most {min(len(photos), len(wnids))} classes available, asked for {n_classes}")
    rng = np.random.default_rng(seed)
    out = []
    for wnid, photo in zip(wnids, photos):
        h, w = photo.shape[:2]
        for _ in range(per_class):
            ch = int(rng.integers(min(min_side, h), min(max_side, h) + 1))
            cw = int(rng.integers(min(min_side, w), min(max_side, w) + 1))
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            out.append((wnid, np.ascontiguousarray(photo[y:y + ch, x:x + cw])))
    return out
