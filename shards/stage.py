"""``python -m shards stage SRC DEST``: copy one split's shard directory to local disk, checked.

DALI reads local files, so before training each node copies the shards it needs from object storage or a
shared filesystem. SRC is a shard directory (docs/design.md section 1) given as a mounted path or an fsspec
URL (``s3://bucket/imagenet/train``, ``gs://...``, ``file:///mnt/shared/train``, ``memory://...``); DEST is a
local directory.

- Every shard listed in SRC's ``manifest.json`` is copied with its index file, plus ``classes.json``
  (and ``rejected.jsonl`` when present). ``manifest.json`` is written last, so a directory that has one is
  complete: an interrupted stage is never mistaken for a finished one.
- Each shard's sha256 is checked against the manifest while it streams in. A shard already in DEST with the
  right size and sha256 is skipped; a wrong one is replaced. Files are written under a temporary name in
  DEST and renamed, so DEST never holds a half-copied shard under its real name.
- Every file the manifest names is looked up in one listing of SRC before anything is copied: a missing
  shard fails at once with a one-line error naming it, and nothing is written.
- DEST must be missing, empty, or an earlier stage of the same SRC (the same ``manifest.json`` and
  ``classes.json``, possibly interrupted): a directory holding another shard directory's metadata or files
  a stage does not write is refused, never overwritten. A full disk stops with one line; the rerun keeps
  the shards already copied.

Object storage goes through fsspec; ``s3://`` needs ``pip install s3fs`` and ``gs://`` ``pip install gcsfs``
(the cluster setup commands install them).
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .fileio import PART, atomic_write, remove_stale_temps, sha256_file, write_bytes
from .manifest import ShardError, load_manifest, read_classes_file

CHUNK = 8 << 20  # bytes per read: large enough for object storage, small enough to hash as we go

# fsspec protocol -> the pip package that implements it (fsspec's own message names the package too, but
# not as a command)
PIP_PACKAGE = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
               "abfss": "adlfs", "hf": "huggingface_hub"}


@dataclass
class StageReport:
    """What one ``stage`` call did; ``copied + skipped`` is the number of shards in the manifest."""
    copied: int = 0
    skipped: int = 0
    replaced: int = 0          # of ``copied``: shards that were in DEST but wrong (size or sha256)
    bytes_copied: int = 0

    def summary(self, dest: str) -> str:
        return (f"staged {self.copied + self.skipped} shards to {dest}: {self.copied} copied "
                f"({self.bytes_copied / 1e6:.1f} MB, {self.replaced} replaced a bad local copy), "
                f"{self.skipped} already present and valid")


def open_source(src: str):
    """``(filesystem, root path)`` for a mounted path or an fsspec URL, with a pip hint if the protocol's
    implementation is not installed."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(src)
    except ImportError as e:
        protocol = src.split("://", 1)[0]
        package = PIP_PACKAGE.get(protocol)
        hint = f"pip install {package}" if package else "install the fsspec implementation it names"
        raise ShardError(f"{src}: cannot read {protocol}:// URLs here ({e}); {hint}") from None
    except ValueError as e:  # fsspec: unknown protocol
        raise ShardError(f"{src}: {e}; use a local path or an fsspec URL such as s3://bucket/dir") from None


def _fetch(fs, remote: str, dest: Path, name: str, expect_sha256: str | None, src: str,
           bar: tqdm | None) -> int:
    """Stream ``remote`` into ``dest/name`` through a temp file, checking sha256; returns bytes copied."""
    h = hashlib.sha256()
    n = 0
    try:
        with fs.open(remote, "rb") as fin, atomic_write(dest / name) as fout:
            while chunk := fin.read(CHUNK):
                fout.write(chunk)
                h.update(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if expect_sha256 is not None and h.hexdigest() != expect_sha256:  # raised inside: nothing renamed
                raise ShardError(f"{src.rstrip('/')}/{name}: sha256 is {h.hexdigest()}, manifest.json says "
                                 f"{expect_sha256}; the source copy is corrupt, rebuild or re-upload it")
    except FileNotFoundError:
        raise ShardError(f"{src.rstrip('/')}/{name}: vanished from the source while staging; "
                         f"check that the source shard directory is complete and rerun") from None
    return n


def _read_metadata(fs, root: str, src: str, scratch: Path) -> tuple[dict, dict[str, int]]:
    """The source's manifest (checked with ``shards.manifest``) and a ``{file name: size}`` listing."""
    fix = "SRC must be a shard directory written by `python -m shards build`"
    try:
        infos = fs.ls(root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        raise ShardError(f"{src}: shard directory not found; {fix}") from None
    listing = {Path(info["name"]).name: info.get("size") for info in infos}
    folders = {Path(info["name"]).name for info in infos if info.get("type") == "directory"}
    for name in ("manifest.json", "classes.json"):
        if name not in listing:
            raise ShardError(f"{src.rstrip('/')}/{name}: not found; {fix}")
        fs.get_file(f"{root.rstrip('/')}/{name}", str(scratch / name))
    try:
        manifest = load_manifest(scratch, check_files=False)
        read_classes_file(scratch / "classes.json")
    except ShardError as e:  # name the source, not the scratch copy
        raise ShardError(str(e).replace(str(scratch), src.rstrip("/"))) from None
    for entry in manifest["shards"]:
        for name in (entry["name"], entry["index"]):
            if name in folders:
                raise ShardError(f"{src.rstrip('/')}/{name}: listed in manifest.json as a file but is a directory; "
                                 f"re-upload the split (or rebuild it with `python -m shards build`)")
    return manifest, listing


def _check_dest(dest: Path, scratch: Path, shards: list[dict]) -> None:
    """DEST is missing, empty, or an earlier (maybe interrupted) stage of this same source: a stage never
    overwrites another shard directory's manifest or classes, nor files it would not have written."""
    fix = "stage into an empty directory (or delete DEST if it is an old copy you no longer need)"
    if dest.exists() and not dest.is_dir():
        raise ShardError(f"{dest}: is a file, not a directory; DEST must be a directory (created if missing)")
    if not dest.is_dir():
        return
    for name in ("manifest.json", "classes.json"):
        here, ours = dest / name, scratch / name
        if here.exists() and not (here.is_file() and here.stat().st_size == ours.stat().st_size
                                  and here.read_bytes() == ours.read_bytes()):
            raise ShardError(f"{here}: DEST holds a different shard directory (its {name} is not SRC's); {fix}")
    written = {e["name"] for e in shards} | {e["index"] for e in shards} | {
        "manifest.json", "classes.json", "rejected.jsonl"}
    others = sorted(p.name for p in dest.iterdir()
                    if p.name not in written and not (p.name.startswith(".") and PART in p.name))
    if others:
        raise ShardError(f"{dest}: holds {len(others)} file(s) a stage of this split does not write (e.g. "
                         f"{others[0][:80]!r}); {fix}")


def _no_room(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def stage(src: str, dest: str | os.PathLike, *, workers: int = 4, progress: bool = True) -> StageReport:
    """Copy the shard directory ``src`` (path or fsspec URL) to the local directory ``dest``; see module doc.

    Safe to rerun (valid shards are skipped) and to run twice at once on one node (each process writes its
    own temp files; the renames are atomic), though the second run copies for nothing.
    """
    if workers < 1:
        raise ShardError(f"--workers is {workers}; use 1 or more parallel copies")
    fs, root = open_source(src)
    dest = Path(dest)
    report = StageReport()
    with tempfile.TemporaryDirectory(prefix="shards-stage-") as scratch_name:
        scratch = Path(scratch_name)
        manifest, listing = _read_metadata(fs, root, src, scratch)
        shards = manifest["shards"]
        for entry in shards:  # all present before anything is written
            for name in (entry["name"], entry["index"]):
                if name not in listing:
                    raise ShardError(f"{src.rstrip('/')}/{name}: listed in manifest.json but missing from the "
                                     f"source; re-upload the split (or rebuild it with `python -m shards build`)")
        _check_dest(dest, scratch, shards)
        try:
            _copy(fs, root, src, dest, scratch, manifest, listing, workers, progress, report)
        except OSError as e:  # DEST's side: the source's are ShardErrors by now
            if _no_room(e):
                raise ShardError(f"{dest}: no space left on the device ({e.strerror}); free some (or choose another "
                                 f"DEST) and rerun: the shards already copied are kept and checked, not "
                                 f"copied again") from None
            raise ShardError(f"{dest}: cannot write {e.filename or 'there'} ({e.strerror}); choose a writable "
                             f"local DEST") from None
    load_manifest(dest)  # every listed file is now in place
    return report


def _copy(fs, root: str, src: str, dest: Path, scratch: Path, manifest: dict, listing: dict[str, int],
          workers: int, progress: bool, report: StageReport) -> None:
    """Copy what DEST lacks (or holds wrong), then classes.json and, last, manifest.json."""
    shards = manifest["shards"]
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)

    todo, replaced = [], set()
    for entry in shards:
        local = dest / entry["name"]
        if local.is_file():
            if local.stat().st_size == entry["bytes"] and sha256_file(local) == entry["sha256"]:
                report.skipped += 1
                continue
            replaced.add(entry["name"])
        todo.append(entry)
    # index files carry no hash in the manifest: fetch one when missing or its size differs
    # (and always with its shard, so a re-uploaded pair stays a pair)
    todo_names = {e["name"] for e in todo}
    index_todo = [e["index"] for e in shards
                  if e["name"] in todo_names or not (dest / e["index"]).is_file()
                  or (listing[e["index"]] is not None
                      and (dest / e["index"]).stat().st_size != listing[e["index"]])]

    total = sum(e["bytes"] for e in todo)
    print(f"stage: {src} -> {dest}: {len(shards)} shards, {len(todo)} to copy "
          f"({total / 1e6:.1f} MB), {report.skipped} already valid", file=sys.stderr, flush=True)
    base = root.rstrip("/")
    with tqdm(total=total, unit="B", unit_scale=True, desc="stage", disable=not progress or not todo,
              file=sys.stderr) as bar:
        def copy_shard(entry: dict) -> int:
            return _fetch(fs, f"{base}/{entry['name']}", dest, entry["name"], entry["sha256"], src, bar)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for n in pool.map(copy_shard, todo):
                report.bytes_copied += n
            for name in index_todo:
                _fetch(fs, f"{base}/{name}", dest, name, None, src, None)
    report.copied = len(todo)
    report.replaced = len(replaced)

    if "rejected.jsonl" in listing:
        _fetch(fs, f"{base}/rejected.jsonl", dest, "rejected.jsonl", None, src, None)
    # classes.json, then manifest.json last: a DEST with a manifest is a complete shard directory
    for name in ("classes.json", "manifest.json"):
        write_bytes(dest / name, (scratch / name).read_bytes())


def source_classes(src: str) -> list[str]:
    """Class names in index order of the shard directory ``src`` (path or URL), reading only classes.json.

    Lets a driver check train/val agree before any node has staged anything."""
    fs, root = open_source(src)
    with tempfile.TemporaryDirectory(prefix="shards-classes-") as scratch:
        local = Path(scratch) / "classes.json"
        try:
            fs.get_file(f"{root.rstrip('/')}/classes.json", str(local))
        except FileNotFoundError:
            raise ShardError(f"{src.rstrip('/')}/classes.json: not found; SRC must be a shard directory "
                             f"written by `python -m shards build`") from None
        try:
            return [e["name"] for e in read_classes_file(local)]
        except ShardError as e:
            raise ShardError(str(e).replace(str(local), f"{src.rstrip('/')}/classes.json")) from None


def stage_once_per_node(stage_to: str, splits: dict[str, str], local_rank: int) -> dict[str, str]:
    """Stage each ``{split: src}`` to ``stage_to/split`` from inside a distributed training worker.

    Only the worker with local rank 0 copies (one copy per node, not one per GPU); every rank then waits
    at a ``torch.distributed`` barrier, so no rank opens a shard before its node's copy is complete.
    Returns ``{split: local dir}``. If the copy fails, that worker raises and the others are stopped
    with the group (Ray Train restarts it, and the rerun only copies what is missing)."""
    local = {split: str(Path(stage_to) / split) for split in splits}
    if local_rank == 0:
        for split, src in splits.items():
            print(stage(src, local[split], progress=False).summary(local[split]), flush=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return local


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stage", help="copy a shard directory to local disk, checking sha256",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="shard directory: a mounted path or an fsspec URL (s3://, gs://, file://, ...)")
    p.add_argument("dest", help="local directory to copy it to (created if missing)")
    p.add_argument("--workers", type=int, default=4, help="shards copied in parallel (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    report = stage(ns.src, ns.dest, workers=ns.workers, progress=not ns.quiet)
    print(report.summary(ns.dest))
    return 0
