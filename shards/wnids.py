"""Human-readable names for ImageNet wnids.

All 1,000 ILSVRC-2012 classes ship with the package (``shards/imagenet_synsets.txt``, the
``LOC_synset_mapping.txt`` of the Kaggle download, which is Caffe's ``synset_words.txt``: one
``n01440764 tench, Tinca tinca`` per line, in class-index order), so every ImageNet build names its
classes. ``--synsets FILE``, or a ``LOC_synset_mapping.txt`` / ``synset_words.txt`` beside SOURCE or its
--csv, overrides them wnid by wnid (other wnid sets, renamed classes). Unknown names get ``""``.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from .manifest import ShardError

SYNSET_FILE_NAMES = ("LOC_synset_mapping.txt", "synset_words.txt")
SHIPPED = "imagenet_synsets.txt"


def parse_synsets(text: str, where: str) -> dict[str, str]:
    """``{wnid: names}`` from ``n01440764 tench, Tinca tinca`` lines; ``where`` names the source in errors."""
    out = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        wnid, _, name = line.partition(" ")
        if not (wnid.startswith("n") and wnid[1:].isdigit()):
            raise ShardError(f"{where}:{line_no}: expected 'n01440764 tench, Tinca tinca', got {line[:60]!r}")
        out[wnid] = name.strip()
    return out


def read_synsets(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: synset file not found; pass LOC_synset_mapping.txt or synset_words.txt")
    return parse_synsets(path.read_text(), str(path))


@functools.cache
def imagenet_synsets() -> dict[str, str]:
    """The 1,000 ILSVRC-2012 wnids and their names, shipped as package data."""
    shipped = resources.files(__package__).joinpath(SHIPPED)
    return parse_synsets(shipped.read_text(encoding="utf-8"), SHIPPED)


def find_synsets_beside(*paths: str | Path | None) -> Path | None:
    """A synset mapping file next to SOURCE or the CSV, if one is there."""
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        for folder in (p.parent, p) if p.is_dir() else (p.parent,):
            for name in SYNSET_FILE_NAMES:
                if (folder / name).is_file():
                    return folder / name
    return None


def describe(names: list[str], synsets: dict[str, str] | None = None) -> list[str]:
    table = {**imagenet_synsets(), **(synsets or {})}
    return [table.get(n, "") for n in names]
