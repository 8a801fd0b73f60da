"""Human-readable names for ImageNet wnids.

The built-in table is small on purpose: it covers the wnids of the trees the tests and samples build
(``shards.sample_data.IMAGENET_WNIDS``). For all 1,000 ILSVRC-2012 classes pass ``--synsets`` with the
mapping that ships with ImageNet (``LOC_synset_mapping.txt`` in the Kaggle download, ``synset_words.txt``
in Caffe's ``ilsvrc12`` aux data: one ``n01440764 tench, Tinca tinca`` per line); a file with either
name beside SOURCE or its --csv is picked up without the flag. Unknown names get ``""``.
"""
from __future__ import annotations

from pathlib import Path

from .manifest import ShardError
from .sample_data import IMAGENET_WNIDS

SYNSET_FILE_NAMES = ("LOC_synset_mapping.txt", "synset_words.txt")


def read_synsets(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: synset file not found; pass LOC_synset_mapping.txt or synset_words.txt")
    out = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        wnid, _, name = line.partition(" ")
        if not (wnid.startswith("n") and wnid[1:].isdigit()):
            raise ShardError(f"{path}:{line_no}: expected 'n01440764 tench, Tinca tinca', got {line[:60]!r}")
        out[wnid] = name.strip()
    return out


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
    table = {**IMAGENET_WNIDS, **(synsets or {})}
    return [table.get(n, "") for n in names]
