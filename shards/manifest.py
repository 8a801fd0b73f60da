"""Reading a shard directory's metadata (docs/design.md section 1).

Every later stage trusts a shard directory through these two functions instead of scanning the tars.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "alexnet-pipeline-shards/1"


class ShardError(ValueError):
    """A one-line, actionable problem with a shard directory or with the sharder's input."""


def _read_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise ShardError(f"{path}: not found; {fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ShardError(f"{path}: expected a JSON object; {fix}")
    return data


def load_manifest(shard_dir: str | os.PathLike, check_files: bool = True) -> dict:
    """Return ``OUT/manifest.json`` as a dict, after checking it is well formed.

    With ``check_files`` every shard and index file it lists must exist (sizes and hashes are left to
    ``python -m shards verify``, which reads every byte).
    """
    shard_dir = Path(shard_dir)
    fix = f"rebuild it with `python -m shards build SOURCE {shard_dir} --split ...`"
    if not shard_dir.is_dir():
        raise ShardError(f"{shard_dir}: shard directory not found; {fix}")
    path = shard_dir / "manifest.json"
    m = _read_json(path, fix)
    if m.get("format") != FORMAT:
        raise ShardError(f"{path}: format is {m.get('format')!r}, expected {FORMAT!r}; {fix}")
    for key, kind in (("split", str), ("num_samples", int), ("total_bytes", int), ("num_classes", int),
                      ("classes", list), ("shards", list), ("rejected", int), ("args", dict)):
        if not isinstance(m.get(key), kind):
            raise ShardError(f"{path}: field {key!r} missing or not a {kind.__name__}; {fix}")
    if len(m["classes"]) != m["num_classes"]:
        raise ShardError(f"{path}: {len(m['classes'])} class names but num_classes={m['num_classes']}; {fix}")
    if not m["shards"]:
        raise ShardError(f"{path}: lists no shards; {fix}")
    total = 0
    for entry in m["shards"]:
        if not isinstance(entry, dict) or not all(
                k in entry for k in ("name", "index", "count", "bytes", "sha256")):
            raise ShardError(f"{path}: malformed shard entry {entry!r}; {fix}")
        total += entry["count"]
        if check_files:
            for k in ("name", "index"):
                if not (shard_dir / entry[k]).is_file():
                    raise ShardError(f"{shard_dir / entry[k]}: listed in manifest.json but missing; {fix}")
    if total != m["num_samples"]:
        raise ShardError(f"{path}: shard counts add up to {total}, num_samples is {m['num_samples']}; {fix}")
    return m


def read_classes_file(path: str | os.PathLike) -> list[dict]:
    """The ``classes`` list of a ``classes.json`` file: ``[{"index", "name", "description"}, ...]``."""
    path = Path(path)
    fix = "pass the classes.json that `python -m shards build` wrote for the train split"
    data = _read_json(path, fix)
    entries = data.get("classes")
    if not isinstance(entries, list) or not entries:
        raise ShardError(f"{path}: no 'classes' list; {fix}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("index") != i or not isinstance(entry.get("name"), str):
            raise ShardError(f"{path}: entry {i} is {entry!r}, expected index {i} and a name; {fix}")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ShardError(f"{path}: class names repeat; {fix}")
    return entries


def load_classes(shard_dir: str | os.PathLike) -> list[str]:
    """Class names in index order, from ``OUT/classes.json``."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise ShardError(f"{shard_dir}: shard directory not found; build it with `python -m shards build`")
    return [e["name"] for e in read_classes_file(shard_dir / "classes.json")]
