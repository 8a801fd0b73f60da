"""``python -m shards verify OUT``: re-check a shard directory against its manifest, reading every byte.

Checks per shard: the tar and its index exist, size and sha256 match the manifest, the sample count
matches, every sample has ``jpg``/``cls``/``json``, every JPEG decodes to an RGB image of the size its
json says with both sides at least ``MIN_SIDE`` pixels, every label is in range, keys are unique across
the split, and the index file is exactly what the tar gives. Exits non-zero naming the first bad shard;
all problems are listed.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import warnings
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from . import fileio
from .fileio import sha256_file
from .images import MIN_SIDE
from .manifest import ShardError, load_classes, load_manifest
from .tarfmt import index_of_tar, split_name


def check_shard(shard_dir: Path, entry: dict, num_classes: int) -> tuple[list[str], list[str]]:
    """Problems found in one shard (empty when it is sound) and the keys it holds."""
    tar_path, idx_path = shard_dir / entry["name"], shard_dir / entry["index"]
    if not tar_path.is_file():
        return [f"{entry['name']}: {'a directory, not a file' if tar_path.is_dir() else 'missing'}"], []
    problems, keys = [], []
    size = tar_path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{entry['name']}: {size} bytes, manifest says {entry['bytes']}")
    digest = sha256_file(tar_path)
    if digest != entry["sha256"]:
        problems.append(f"{entry['name']}: sha256 {digest[:12]}... differs from the manifest's {entry['sha256'][:12]}...")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                if member.isreg():
                    if member.offset_data + member.size > size:  # never trust a header's size: read what is there
                        return problems + [f"{entry['name']}: member {member.name[:80]!r} declares {member.size} "
                                           f"bytes, past the end of the {size}-byte tar"], []
                    key, ext = split_name(member.name)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        return problems + [f"{entry['name']}: unreadable tar ({e})"], []
    if len(samples) != entry["count"]:
        problems.append(f"{entry['name']}: {len(samples)} samples, manifest says {entry['count']}")
    for key, parts in samples.items():
        keys.append(key)
        where = f"{entry['name']}: sample {key}"
        if set(parts) != {"jpg", "cls", "json"}:
            problems.append(f"{where}: members {sorted(parts)}, expected cls, jpg, json")
            continue
        try:
            cls = int(parts["cls"].decode())
        except ValueError:
            problems.append(f"{where}: cls {parts['cls'][:20]!r} is not a decimal integer")
            continue
        if not 0 <= cls < num_classes:
            problems.append(f"{where}: label {cls} outside 0..{num_classes - 1}")
        try:
            meta = json.loads(parts["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"json is a {type(meta).__name__}, not an object")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = Image.open(io.BytesIO(parts["jpg"]))
                img.load()
        except Exception as e:  # noqa: BLE001 - any failure is a finding, not a crash
            problems.append(f"{where}: does not decode ({type(e).__name__}: {e})")
            continue
        if img.format != "JPEG" or img.mode != "RGB":
            problems.append(f"{where}: {img.format} {img.mode}, expected an RGB JPEG")
        if (meta.get("width"), meta.get("height")) != img.size:
            problems.append(f"{where}: json says {meta.get('width')}x{meta.get('height')}, image is "
                            f"{img.size[0]}x{img.size[1]}")
        if min(img.size) < MIN_SIDE:
            problems.append(f"{where}: image is {img.size[0]}x{img.size[1]}, under the {MIN_SIDE}-pixel minimum "
                            f"side that build keeps (the loaders' crops need room)")
    if not idx_path.is_file():
        problems.append(f"{entry['index']}: {'a directory, not a file' if idx_path.is_dir() else 'missing'}")
    elif not _same_text(idx_path, index_of_tar(tar_path)):
        problems.append(f"{entry['index']}: does not match {entry['name']} (regenerate: rebuild the split)")
    return problems, keys


def _same_text(path: Path, text: str) -> bool:
    """Whether the file holds exactly ``text``; sizes first, so a huge or binary file is never read whole."""
    data = text.encode()
    if path.stat().st_size != len(data):
        return False
    with open(path, "rb") as f:
        return f.read() == data


def _check(args):
    return check_shard(*args)


def verify(shard_dir: str | Path, workers: int = 1, progress: bool = True) -> list[str]:
    """All problems found (empty list: the directory matches its manifest)."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir, check_files=False)
    problems = []
    classes = load_classes(shard_dir)
    if classes != manifest["classes"]:
        problems.append("classes.json: class names differ from manifest.json's")
    listed = {e["name"] for e in manifest["shards"]} | {e["index"] for e in manifest["shards"]}
    for p in sorted(shard_dir.iterdir()):  # not glob: a split name is data, not a pattern
        if p.name.startswith(f"{manifest['split']}-") and p.name not in listed:
            problems.append(f"{p.name}: not listed in manifest.json")
    jobs = [(shard_dir, e, manifest["num_classes"]) for e in manifest["shards"]]
    seen: dict[str, str] = {}
    ctx = fileio.pool_context()
    with (ctx.Pool(workers) if workers > 1 else _NoPool()) as pool:
        results = pool.imap(_check, jobs)
        for entry, (found, keys) in tqdm(zip(manifest["shards"], results), total=len(jobs), unit="shard",
                                         desc="verify", disable=not progress, file=sys.stderr):
            problems.extend(found)
            for key in keys:
                if key in seen:
                    problems.append(f"{entry['name']}: key {key} also in {seen[key]}")
                seen[key] = entry["name"]
    return problems


class _NoPool:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, jobs):
        return map(fn, jobs)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("verify", help="re-check a shard directory against its manifest",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a shard directory written by `python -m shards build`")
    p.add_argument("--workers", type=int, default=1, help="shards checked in parallel (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    problems = verify(ns.out, workers=max(1, ns.workers), progress=not ns.quiet)
    if problems:
        for line in problems:
            print(f"verify: {ns.out}/{line}", file=sys.stderr)
        raise ShardError(f"{ns.out}: {len(problems)} problem(s), first: {problems[0]}; rebuild the split")
    m = load_manifest(ns.out)
    print(f"{ns.out}: OK: {m['num_samples']} samples in {len(m['shards'])} shards, {m['num_classes']} classes, "
          f"sha256, decode, labels and index files checked")
    return 0
