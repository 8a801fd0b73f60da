"""Reading a shard directory's metadata (docs/design.md section 1).

Every later stage trusts a shard directory through these two functions instead of scanning the tars.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

FORMAT = "alexnet-pipeline-shards/1"
MAX_JSON_BYTES = 64 << 20  # ImageNet's train manifest is ~0.3 MB: anything this big is not ours
SHA256 = re.compile(r"[0-9a-f]{64}")


class ShardError(ValueError):
    """A one-line, actionable problem with a shard directory or with the sharder's input."""


def _read_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "not found"
        raise ShardError(f"{path}: {what}; {fix}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ShardError(f"{path}: {path.stat().st_size} bytes, more than a shard directory's metadata "
                         f"({MAX_JSON_BYTES} at most); {fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError too
        raise ShardError(f"{path}: not valid JSON ({str(e)[:160]}); {fix}") from None
    if not isinstance(data, dict):
        raise ShardError(f"{path}: expected a JSON object; {fix}")
    return data


def plain_file_name(name: object) -> bool:
    """A file directly inside the shard directory: no ``/``, no ``..``, not absolute, not empty, and
    printable (a newline in a name would split the one-line errors that quote it)."""
    if not (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and name.isprintable()):
        return False
    try:
        return len(name.encode()) <= 255  # the filesystem's limit; lone surrogates do not encode
    except UnicodeEncodeError:
        return False


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
        if not isinstance(m.get(key), kind) or kind is int and not _is_count(m[key]):
            what = "a non-negative integer" if kind is int else f"a {kind.__name__}"
            raise ShardError(f"{path}: field {key!r} missing or not {what}; {fix}")
    if not plain_file_name(m["split"]):
        raise ShardError(f"{path}: split {m['split'][:80]!r} is not a plain name; {fix}")
    if not all(isinstance(c, str) for c in m["classes"]):
        raise ShardError(f"{path}: 'classes' holds a non-string class name; {fix}")
    if len(m["classes"]) != m["num_classes"]:
        raise ShardError(f"{path}: {len(m['classes'])} class names but num_classes={m['num_classes']}; {fix}")
    if not m["shards"]:
        raise ShardError(f"{path}: lists no shards; {fix}")
    total = 0
    for i, entry in enumerate(m["shards"]):
        if not isinstance(entry, dict) or not all(
                k in entry for k in ("name", "index", "count", "bytes", "sha256")):
            raise ShardError(f"{path}: malformed shard entry {str(entry)[:200]}; {fix}")
        for k in ("name", "index"):  # a path would let a manifest point readers at any file on the machine
            if not plain_file_name(entry[k]):
                raise ShardError(f"{path}: shard {i} {k} {str(entry[k])[:80]!r} is not a plain file name inside "
                                 f"the shard directory; {fix}")
        if not (_is_count(entry["count"]) and _is_count(entry["bytes"]) and isinstance(entry["sha256"], str)
                and SHA256.fullmatch(entry["sha256"])):
            raise ShardError(f"{path}: shard {i} ({entry['name']}) needs a non-negative integer count and bytes "
                             f"and a 64-digit hex sha256; {fix}")
        total += entry["count"]
        if check_files:
            for k in ("name", "index"):
                if (shard_dir / entry[k]).is_dir():
                    raise ShardError(f"{shard_dir / entry[k]}: listed in manifest.json as a file but is a "
                                     f"directory; {fix}")
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
        if (not isinstance(entry, dict) or entry.get("index") != i or isinstance(entry.get("index"), bool)
                or not isinstance(entry.get("name"), str) or not isinstance(entry.get("description", ""), str)):
            raise ShardError(f"{path}: entry {i} is {str(entry)[:200]}, expected index {i}, a name and a "
                             f"text description; {fix}")
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
