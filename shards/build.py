"""``python -m shards build SOURCE OUT --split train|val|test``: any labelled image set -> WebDataset shards.

Flow: scan SOURCE into items (sorted), fix the class map, shuffle globally with --seed, then workers turn
items into JPEG bytes in order while this process writes shards. The output of every step depends only
on the input and the arguments that change bytes (never on --workers or timing), so the same command
always writes byte-identical shards and manifest.

Resume: each finished shard is renamed into OUT and recorded in ``OUT/.partial/progress.jsonl`` (which
item comes next, and the rejects so far). Rerunning the same command keeps the recorded shards whose
bytes still match and carries on from there. The manifest is written last; ``.partial`` is then removed.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from . import fileio
from .fileio import atomic_write, sha256_file, write_bytes
from .images import EncodeConfig, Rejected, prepare_image
from .manifest import FORMAT, ShardError, read_classes_file
from .sources import INPUT_FORMS, Item, read_item_bytes, scan_source
from .tarfmt import ShardWriter, sample_tar_bytes, tar_file_size
from .wnids import describe, find_synsets_beside, read_synsets

SPLITS = ("train", "val", "test")
PARTIAL = ".partial"
LOCK = ".lock"          # held (flock) by the build writing OUT; removed when it ends
INPUT = "input.json"    # in .partial: the fingerprint of the input listing and class map being built


@dataclass(frozen=True)
class BuildConfig:
    source: str
    out: str
    split: str
    classes: str | None = None
    seed: int = 0
    max_count: int = 1000
    max_size: int = 256 * 1024 * 1024
    resize_shorter: int | None = None
    max_side: int | None = None
    quality: int = 90
    input: str = "auto"
    csv: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    suffix: str | None = None
    synsets: str | None = None
    strict: bool = False
    workers: int = 1

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"--split {self.split!r}: use one of {', '.join(SPLITS)}")
        if self.input not in INPUT_FORMS:
            raise ValueError(f"--input {self.input!r}: use one of {', '.join(INPUT_FORMS)}")
        if self.max_count < 1:
            raise ValueError(f"--max-count {self.max_count}: must be at least 1")
        if self.max_size < 4096:
            raise ValueError(f"--max-size {self.max_size}: must be at least 4096 bytes")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers}: must be at least 1")
        if (self.id_column or self.label_column) and not self.csv:
            raise ValueError("--id-column / --label-column need --csv LABELS.csv")
        self.encode  # validates resize / quality

    @property
    def encode(self) -> EncodeConfig:
        return EncodeConfig(self.resize_shorter, self.max_side, self.quality)

    def recorded_args(self) -> dict:
        """The arguments written to manifest.json: those that change the output's bytes, without paths
        that differ between machines or runs (file names only), and without --workers."""
        args = asdict(self)
        del args["workers"], args["out"]
        for key in ("source", "csv", "synsets"):
            if args[key] is not None:
                args[key] = Path(args[key]).name
        if args["classes"] is not None:
            args["classes"] = Path(args["classes"]).name
        return args


# ---------------------------------------------------------------- per-item work (runs in the workers)

_ENCODE: EncodeConfig | None = None



def _init_worker(encode: EncodeConfig) -> None:
    global _ENCODE
    _ENCODE = encode


def process_item(item: Item) -> tuple[bytes, int, int] | str:
    """JPEG bytes and size, or the reject reason."""
    if item.problem:
        return item.problem
    try:
        data = read_item_bytes(item)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    try:
        return prepare_image(data, _ENCODE)
    except Rejected as e:
        return str(e)


def sample_members(item: Item, cls: int, jpg: bytes, width: int, height: int) -> list[tuple[str, bytes]]:
    meta = {"file": item.file, "label": item.label, "width": width, "height": height}
    return [("cls", str(cls).encode()), ("jpg", jpg),
            ("json", json.dumps(meta, separators=(",", ":")).encode())]


# ---------------------------------------------------------------- output files

def shard_name(split: str, number: int, ext: str) -> str:
    return f"{split}-{number:06d}.{ext}"


class _HashingFile:
    """A shard being written with :func:`atomic_write`, hashing and counting what goes through it.

    It spans many ``add`` calls, so the ``with`` is held open by hand: ``commit()`` ends it normally (the tar
    appears in OUT), ``discard()`` ends it with the error being handled (the temporary file is removed)."""

    def __init__(self, path: Path):
        self._writing = atomic_write(path)
        self.f = self._writing.__enter__()
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.bytes

    def commit(self) -> None:
        self._writing.__exit__(None, None, None)

    def discard(self) -> None:
        self._writing.__exit__(*sys.exc_info())


class ShardSink:
    """Cuts the ordered stream of samples into shards and records each finished one in progress.jsonl."""

    def __init__(self, cfg: BuildConfig, out: Path, records: list[dict]):
        self.cfg, self.out, self.records = cfg, out, records
        self.partial = out / PARTIAL
        self.number = len(records)
        self.writer: ShardWriter | None = None
        self.file: _HashingFile | None = None
        self.count = 0
        self.tar_bytes = 0
        self.max_size = [0, 0]   # the open shard's largest stored width and height
        self.rejected: list[dict] = []

    def _open(self) -> None:
        self.file = _HashingFile(self.out / shard_name(self.cfg.split, self.number, "tar"))
        self.writer = ShardWriter(self.file)
        self.count = self.tar_bytes = 0
        self.max_size = [0, 0]

    def add(self, position: int, key: str, members: list[tuple[str, bytes]], image: tuple[int, int]) -> None:
        size = sample_tar_bytes(members)
        if self.writer is not None and (self.count >= self.cfg.max_count or
                                        tar_file_size(self.tar_bytes + size) > self.cfg.max_size):
            self.finish(next_position=position)
        if self.writer is None:
            self._open()
        self.writer.write(key, members)
        self.max_size = [max(self.max_size[0], image[0]), max(self.max_size[1], image[1])]
        self.count += 1
        self.tar_bytes += size

    def reject(self, item: Item, reason: str) -> None:
        self.rejected.append({"path": item.file, "reason": reason})

    def finish(self, next_position: int) -> None:
        """Close the open shard, commit it to OUT, record it; rejects seen so far go with it."""
        if self.writer is None:
            if self.rejected and self.records:  # trailing rejects after the last shard
                self.records[-1]["rejected"].extend(self.rejected)
                self.records[-1]["next"] = next_position
                self.rejected = []
                self._rewrite_progress()
            return
        index_text = self.writer.close()
        tar_name = shard_name(self.cfg.split, self.number, "tar")
        idx_name = shard_name(self.cfg.split, self.number, "idx")
        write_bytes(self.out / idx_name, index_text.encode())
        self.file.commit()
        record = {"name": tar_name, "index": idx_name, "count": self.count, "bytes": self.file.bytes,
                  "sha256": self.file.sha.hexdigest(), "max_width": self.max_size[0], "max_height": self.max_size[1],
                  "next": next_position, "rejected": self.rejected}
        self.records.append(record)
        with open(self.partial / "progress.jsonl", "a") as f:  # the commit point of this shard
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.writer, self.file, self.rejected = None, None, []
        self.number += 1

    def _rewrite_progress(self) -> None:
        write_bytes(self.partial / "progress.jsonl",
                    "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def abandon(self) -> None:
        """Called while handling the error that stops the build: the unfinished shard is not committed."""
        if self.file is not None:
            self.file.discard()
            self.file = None


class BoundedFeed:
    """Yields items to the pool at most ``capacity`` ahead of the writer.

    ``Pool.imap`` would otherwise read the whole list ahead and hold every finished image in memory
    whenever the workers outrun the disk (140 GB for ImageNet).
    """

    def __init__(self, items: list, capacity: int):
        self.items, self.slots, self.stopped = items, threading.Semaphore(capacity), threading.Event()

    def __iter__(self):
        for item in self.items:
            while not self.slots.acquire(timeout=0.1):
                if self.stopped.is_set():  # the run was aborted: let the pool's feeder thread finish
                    return
            yield item

    def consumed(self) -> None:
        self.slots.release()

    def stop(self) -> None:
        self.stopped.set()


# ---------------------------------------------------------------- resume

@contextlib.contextmanager
def hold_out_dir(out: Path):
    """Create OUT and hold ``OUT/.lock`` for the block: a second build into OUT stops with one line."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: exists and is not a directory; pass a new OUT_DIR")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShardError(f"{out}: another build is writing to it (it holds {path}); wait for that build "
                             f"to finish, or pass another OUT_DIR") from None
        try:  # the previous holder may have removed the file between our open and our lock: retry then
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:  # a build that stopped before writing anything leaves no empty OUT behind
            with contextlib.suppress(OSError):
                out.rmdir()


def input_fingerprint(items: list[Item], classes: list[dict]) -> dict:
    """What a resumed build must find again: the same files (names, labels, tar offsets) and class map."""
    listing = [[it.file, it.label, it.offset, it.size, it.problem] for it in items]
    digest = hashlib.sha256(json.dumps([[c["name"] for c in classes], listing]).encode()).hexdigest()
    return {"sha256": digest, "files": len(items), "classes": len(classes)}


def _check_input(partial: Path, fingerprint: dict | None) -> bool:
    """True when the interrupted build in OUT started from this input (or no fingerprint is asked for)."""
    if fingerprint is None:
        return True
    try:
        return json.loads((partial / INPUT).read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def prepare_out_dir(cfg: BuildConfig, out: Path, args: dict, fingerprint: dict | None = None) -> list[dict] | None:
    """Make OUT ready; return the finished shard records to keep, or None when OUT is already complete.

    ``fingerprint`` (:func:`input_fingerprint`) is recorded in a new build and must match to resume one."""
    partial = out / PARTIAL
    manifest_path = out / "manifest.json"
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: exists and is not a directory; pass a new OUT_DIR")
    out.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists() and not partial.exists():
        try:
            old = json.loads(manifest_path.read_text()).get("args")
        except (OSError, json.JSONDecodeError):
            old = None
        if old == args:
            return None
        raise ShardError(f"{out}: already holds shards built with other arguments; "
                         f"pass a new OUT_DIR or delete this one")
    if not partial.exists():
        stray = [p.name for p in out.iterdir() if p.name != LOCK]
        if stray:
            listed = ", ".join(sorted(stray)[:3]) + (", ..." if len(stray) > 3 else "")
            raise ShardError(f"{out}: not empty ({listed}); "
                             f"pass a new or empty OUT_DIR")
        partial.mkdir()
        write_bytes(partial / "args.json", json.dumps(args, sort_keys=True).encode())
        if fingerprint is not None:
            write_bytes(partial / INPUT, json.dumps(fingerprint).encode())
        return []
    try:
        old_args = json.loads((partial / "args.json").read_text())
    except (OSError, json.JSONDecodeError):
        old_args = None
    progress = partial / "progress.jsonl"
    same_input = _check_input(partial, fingerprint)
    if (old_args != args or not same_input) and not (progress.exists() and progress.read_text().strip()):
        # An interrupted build that finished no shard: nothing worth keeping, start over with these args.
        for p in out.iterdir():  # only this build's files can be here (OUT was empty when it began)
            if p.is_file() and p.name != LOCK:
                p.unlink()
        shutil.rmtree(partial)
        return prepare_out_dir(cfg, out, args, fingerprint)
    if old_args != args:
        raise ShardError(f"{out}: holds an interrupted build with other arguments; rerun that command "
                         f"to resume it, or pass a new OUT_DIR")
    if not same_input:
        was = _read_fingerprint(partial)
        then = f"{was['files']} files in {was['classes']} classes" if was else "an unrecorded input"
        raise ShardError(f"{out}: holds an interrupted build of other input (then {then}, now "
                         f"{fingerprint['files']} files in {fingerprint['classes']} classes); restore SOURCE "
                         f"as it was to resume, or delete {out} to start over")
    records = []
    lines = progress.read_text().splitlines() if progress.exists() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line: that shard is redone
        tar, idx = out / record["name"], out / record["index"]
        if not (tar.is_file() and idx.is_file() and tar.stat().st_size == record["bytes"]
                and sha256_file(tar) == record["sha256"]):
            break
        records.append(record)
    # Everything after the last good record is redone: remove it so the result matches a clean run.
    keep = {r[k] for r in records for k in ("name", "index")} | {LOCK}
    for p in out.iterdir():
        if p.is_file() and p.name not in keep:
            p.unlink()
    for p in partial.iterdir():
        if p.name not in ("args.json", "progress.jsonl", INPUT):
            p.unlink()
    write_bytes(progress, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


def _read_fingerprint(partial: Path) -> dict | None:
    try:
        was = json.loads((partial / INPUT).read_text())
        return was if isinstance(was, dict) and {"files", "classes"} <= set(was) else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- the command

def class_table(cfg: BuildConfig, source_labels: list[str], items: list[Item]) -> list[dict]:
    synsets_path = cfg.synsets or find_synsets_beside(cfg.source, cfg.csv)
    synsets = read_synsets(synsets_path) if synsets_path else {}
    if cfg.classes:
        entries = read_classes_file(cfg.classes)
        known = {e["name"] for e in entries}
        for item in items:
            if item.label and item.label not in known:
                raise ShardError(f"{item.file}: label {item.label!r} is not in {cfg.classes}; "
                                 f"shard with the train split's classes.json, or fix the label")
        descriptions = describe([e["name"] for e in entries], synsets)
        return [{"index": e["index"], "name": e["name"], "description": e.get("description") or d}
                for e, d in zip(entries, descriptions)]
    names = sorted(set(source_labels) | {it.label for it in items if it.label})
    return [{"index": i, "name": n, "description": d} for i, (n, d) in enumerate(zip(names, describe(names, synsets)))]


def largest_image(records: list[dict]) -> dict:
    """manifest.json's ``max_width`` / ``max_height``: the largest stored sides (GPU decoders preallocate for
    them). Omitted when a resumed build kept shards recorded before the fields existed."""
    if not all("max_width" in r for r in records):
        return {}
    return {"max_width": max(r["max_width"] for r in records), "max_height": max(r["max_height"] for r in records)}


def build(cfg: BuildConfig, progress: bool = True) -> dict:
    """Run the whole build; return the manifest. One build at a time writes an OUT (``OUT/.lock``)."""
    with hold_out_dir(Path(cfg.out)):
        return _build(cfg, progress)


def _build(cfg: BuildConfig, progress: bool) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    src = scan_source(cfg.source, cfg.input, cfg.csv, cfg.id_column, cfg.label_column, cfg.suffix, out=out)
    classes = class_table(cfg, src.labels, src.items)
    index_of = {c["name"]: c["index"] for c in classes}
    items = list(src.items)
    random.Random(cfg.seed).shuffle(items)
    args = cfg.recorded_args()

    records = prepare_out_dir(cfg, out, args, input_fingerprint(src.items, classes))
    if records is None:
        print(f"{out}: already complete (same arguments); nothing to do. Check it with "
              f"`python -m shards verify {out}`", file=sys.stderr)
        return json.loads((out / "manifest.json").read_text())
    start = records[-1]["next"] if records else 0
    if start:
        print(f"resuming: {len(records)} finished shards kept, {len(items) - start} of {len(items)} "
              f"files left", file=sys.stderr)

    sink = ShardSink(cfg, out, records)
    todo = items[start:]
    bar = tqdm(total=len(items), initial=start, unit="img", desc=f"build {cfg.split}", disable=not progress,
               file=sys.stderr, smoothing=0.1, mininterval=0.5)
    pool = None
    window = BoundedFeed(todo, capacity=64 * cfg.workers)
    try:
        if cfg.workers > 1:
            pool = fileio.pool_context().Pool(cfg.workers, _init_worker, (cfg.encode,))
            results = pool.imap(process_item, window, chunksize=8)
        else:
            _init_worker(cfg.encode)
            results = map(process_item, window)
        for position, (item, result) in enumerate(zip(todo, results), start=start):
            window.consumed()
            if isinstance(result, str):
                if cfg.strict:
                    raise ShardError(f"{item.file}: {result} (--strict makes any reject fatal; "
                                     f"drop --strict to skip it into rejected.jsonl)")
                sink.reject(item, result)
            elif item.label:
                jpg, width, height = result
                key = f"{cfg.split}_{position:08d}"
                sink.add(position, key, sample_members(item, index_of[item.label], jpg, width, height), (width, height))
            bar.update(1)
        sink.finish(next_position=len(items))
    except KeyboardInterrupt:
        sink.abandon()
        raise ShardError(f"{out}: interrupted after {len(sink.records)} finished shards; rerun the same "
                         f"command to resume") from None
    except BaseException:
        sink.abandon()
        raise
    finally:
        bar.close()
        window.stop()
        if pool is not None:
            pool.terminate()
            pool.join()

    records = sink.records
    if not records:
        shutil.rmtree(out / PARTIAL)
        raise ShardError(f"{cfg.source}: no usable images (all {len(items)} rejected, see reasons above); "
                         f"check SOURCE")
    rejected = sorted((r for rec in records for r in rec["rejected"]), key=lambda r: (r["path"], r["reason"]))
    shards = [{k: r[k] for k in ("name", "index", "count", "bytes", "sha256")} for r in records]
    manifest = {
        "format": FORMAT,
        "split": cfg.split,
        "num_samples": sum(s["count"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "num_classes": len(classes),
        "classes": [c["name"] for c in classes],
        "shards": shards,
        "rejected": len(rejected),
        "args": args,
        **largest_image(records),
    }
    write_bytes(out / "classes.json", (json.dumps({"classes": classes}, indent=1) + "\n").encode())
    write_bytes(out / "rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected).encode())
    write_bytes(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    shutil.rmtree(out / PARTIAL)

    seconds = time.perf_counter() - t0
    done = len(items) - start
    reasons = Counter(r["reason"].split(":")[0] for r in rejected)
    print(f"{out}: {manifest['num_samples']} images in {len(shards)} shards "
          f"({manifest['total_bytes'] / 1e6:.1f} MB), {len(classes)} classes, {len(rejected)} rejected"
          + (f" ({'; '.join(f'{n} {r}' for r, n in reasons.most_common())}; see rejected.jsonl)" if rejected else "")
          + f"; {done} files in {seconds:.1f} s ({done / max(seconds, 1e-9):.0f} images/s)", file=sys.stderr)
    return manifest


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build", help="shard a labelled image set",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="class-folder tree, ILSVRC2012_img_train.tar, or an image folder with --csv")
    p.add_argument("out", help="output directory for this split's shards (new or empty, or an interrupted build)")
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--classes", help="reuse this classes.json (the train split's) for val/test")
    p.add_argument("--seed", type=int, default=0, help="global shuffle seed (default 0)")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default 1000)")
    p.add_argument("--max-size", type=int, default=256 * 1024 * 1024, help="bytes per shard file at most, unless one sample is larger (default 256 MiB)")
    p.add_argument("--resize-shorter", type=int, help="downscale so the shorter side is at most N, re-encode")
    p.add_argument("--max-side", type=int, help="downscale so the longer side is at most N, re-encode")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality for re-encoded images (default 90)")
    p.add_argument("--input", choices=INPUT_FORMS, default="auto", help="input form (default: detect)")
    p.add_argument("--csv", help="labels CSV: LOC_val_solution.csv, or any with --id-column/--label-column")
    p.add_argument("--id-column", help="CSV column naming the image file (without --suffix)")
    p.add_argument("--label-column", help="CSV column holding the label")
    p.add_argument("--suffix", help="appended to the id to get the file name (.JPEG for LOC_val_solution.csv)")
    p.add_argument("--synsets", help="wnid -> name file (LOC_synset_mapping.txt format); overrides, wnid by wnid, "
                   "the 1,000 ILSVRC-2012 names that ship with the package")
    p.add_argument("--strict", action="store_true", help="any rejected file is fatal")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(ns).items() if k in BuildConfig.__dataclass_fields__}
    try:
        cfg = BuildConfig(**fields)
    except ValueError as e:
        raise ShardError(str(e)) from None
    try:
        build(cfg, progress=not ns.quiet)
    except OSError as e:  # the disk filled up, OUT turned read-only, ...: what the rerun resumes from is safe
        where = e.filename or cfg.out
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise ShardError(f"{where}: {e.strerror or e}; {'free space' if full else 'fix that'} and rerun the "
                         f"same command to resume (or pass another OUT_DIR)") from None
    return 0
