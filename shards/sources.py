"""The four input forms, each turned into a sorted list of :class:`Item` (file name, label, where its bytes are).

1. ``folders``: a class-folder tree ``ROOT/<class>/<file>`` (files may sit in sub-folders of the class).
2. ``imagenet-tar``: ``ILSVRC2012_img_train.tar``, a tar of per-class tars ``n01440764.tar`` (also a plain
   tar of class folders). Read in place: one pass over the headers records where each image's bytes are,
   workers then read them by offset. Nothing is unpacked to disk.
3. ``csv`` with ImageNet's ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``): the file is
   ``SOURCE/<ImageId>.JPEG`` and the label is the first token of PredictionString.
4. ``csv`` with named columns (Kaggle style): ``--id-column id --label-column species --suffix .jpg``.

Items that are already known to be bad (unsafe tar paths, files listed in a CSV but absent) carry a
``problem`` and end up in rejected.jsonl with the images that fail to decode.
"""
from __future__ import annotations

import csv
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .manifest import ShardError

INPUT_FORMS = ("auto", "folders", "imagenet-tar", "csv")
LOC_HEADER = ("ImageId", "PredictionString")


@dataclass(frozen=True, slots=True)
class Item:
    file: str                 # source file name, relative to SOURCE (stored in the sample's json)
    label: str                # original label name (wnid, folder name, CSV value)
    path: str                 # file to read: the image itself, or the tar that holds it
    offset: int = -1          # >= 0: the bytes are path[offset:offset + size] (inside a tar)
    size: int = -1
    problem: str = ""         # non-empty: reject with this reason without reading


@dataclass
class Source:
    form: str
    items: list[Item]
    labels: list[str]         # every label the source names (class folders count even when empty)


_TAR_FDS: dict[str, int] = {}  # open tars, kept across items; pread has no shared offset, so forks are safe


def read_item_bytes(item: Item) -> bytes:
    if item.offset < 0:
        with open(item.path, "rb") as f:
            return f.read()
    fd = _TAR_FDS.get(item.path)
    if fd is None:
        fd = _TAR_FDS[item.path] = os.open(item.path, os.O_RDONLY)
    data = os.pread(fd, item.size, item.offset)
    if len(data) != item.size:
        raise OSError(f"{item.path}: ends before byte {item.offset + item.size} (truncated tar)")
    return data


def unsafe_member_name(name: str) -> str:
    """Why a tar member name must not be trusted ('' when it is fine)."""
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return f"unsafe tar member path (absolute): {name}"
    if ".." in PurePosixPath(name).parts:
        return f"unsafe tar member path (contains '..'): {name}"
    return ""


def detect_form(source: Path, form: str, csv_path: str | None) -> str:
    if not source.exists():
        raise ShardError(f"{source}: SOURCE not found; pass a class-folder tree, an image folder with --csv, "
                         f"or ILSVRC2012_img_train.tar")
    if form != "auto":
        return form
    if csv_path is not None:
        return "csv"
    if source.is_file():
        if tarfile.is_tarfile(source):
            return "imagenet-tar"
        raise ShardError(f"{source}: a file but not a tar; pass a folder, or ILSVRC2012_img_train.tar")
    return "folders"


def scan_folders(root: Path) -> Source:
    if not root.is_dir():
        raise ShardError(f"{root}: not a directory; --input folders needs ROOT/<class>/<file>")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p for p in root.iterdir() if p.is_file()]
        hint = " (it holds files: for a flat folder pass --csv LABELS.csv)" if loose else ""
        raise ShardError(f"{root}: no class folders found{hint}; expected ROOT/<class>/<image>")
    items = []
    for class_dir in class_dirs:
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                items.append(Item(file=full.relative_to(root).as_posix(), label=class_dir.name, path=str(full)))
    return Source("folders", items, [d.name for d in class_dirs])


def scan_imagenet_tar(tar_path: Path) -> Source:
    items: list[Item] = []
    labels: set[str] = set()
    try:
        outer = tarfile.open(tar_path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{tar_path}: cannot read as a tar ({e}); pass ILSVRC2012_img_train.tar") from None
    with outer:
        for member in outer:
            problem = unsafe_member_name(member.name)
            if problem:
                if member.isreg():
                    items.append(Item(member.name, "", str(tar_path), problem=problem))
                continue
            if not member.isreg():
                continue
            parts = PurePosixPath(member.name).parts
            if member.name.endswith(".tar"):
                label = PurePosixPath(member.name).stem
                labels.add(label)
                items.extend(_scan_inner_tar(outer, member, label, tar_path))
            elif len(parts) >= 2:  # a plain tar of class folders: <class>/<file>
                label = parts[0]
                labels.add(label)
                items.append(Item(member.name, label, str(tar_path), member.offset_data, member.size))
            else:
                items.append(Item(member.name, "", str(tar_path),
                                  problem="tar member is neither a per-class tar nor inside a class folder"))
    items.sort(key=lambda it: (it.label, it.file))
    return Source("imagenet-tar", items, sorted(labels))


def _scan_inner_tar(outer: tarfile.TarFile, member: tarfile.TarInfo, label: str, tar_path: Path) -> list[Item]:
    fileobj = outer.extractfile(member)
    try:
        inner = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.TarError as e:
        return [Item(member.name, label, str(tar_path), problem=f"per-class tar unreadable: {e}")]
    out = []
    with inner:
        for m in inner:
            if not m.isreg():
                continue
            name = f"{label}/{m.name}"
            problem = unsafe_member_name(m.name)
            if problem:
                out.append(Item(name, label, str(tar_path), problem=problem))
            else:
                out.append(Item(name, label, str(tar_path), member.offset_data + m.offset_data, m.size))
    return out


def scan_csv(root: Path, csv_path: Path, id_column: str | None, label_column: str | None,
             suffix: str | None) -> Source:
    if not root.is_dir():
        raise ShardError(f"{root}: not a directory; with --csv, SOURCE is the folder holding the images")
    if not csv_path.is_file():
        raise ShardError(f"{csv_path}: CSV file not found; pass the labels file with --csv")
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ShardError(f"{csv_path}: empty CSV; expected a header row")
        header = [h.strip() for h in header]
        rows = list(reader)
    loc = tuple(header[:2]) == LOC_HEADER and id_column is None and label_column is None
    if loc:
        id_idx, label_idx, suffix = 0, 1, ".JPEG" if suffix is None else suffix
    else:
        if id_column is None or label_column is None:
            raise ShardError(f"{csv_path}: header {','.join(header)} is not ImageNet's "
                             f"{','.join(LOC_HEADER)}; name the columns with --id-column and --label-column")
        for col in (id_column, label_column):
            if col not in header:
                raise ShardError(f"{csv_path}: no column {col!r} (columns: {', '.join(header)}); "
                                 f"fix --id-column / --label-column")
        id_idx, label_idx, suffix = header.index(id_column), header.index(label_column), suffix or ""
    items, labels, seen = [], set(), set()
    for line_no, row in enumerate(rows, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(id_idx, label_idx):
            raise ShardError(f"{csv_path}:{line_no}: row has {len(row)} fields, expected {len(header)}; fix the CSV")
        image_id = row[id_idx].strip()
        label = row[label_idx].split()[0] if loc and row[label_idx].split() else row[label_idx].strip()
        if not label:
            raise ShardError(f"{csv_path}:{line_no}: empty label for {image_id!r}; fix the CSV")
        name = f"{image_id}{suffix}"
        labels.add(label)
        path = root / name
        if unsafe_member_name(name):
            items.append(Item(name, label, str(path), problem=f"unsafe id in CSV: {image_id}"))
        elif name in seen:
            items.append(Item(name, label, str(path), problem=f"duplicate id in CSV line {line_no}"))
        elif not path.is_file():
            items.append(Item(name, label, str(path), problem=f"listed in {csv_path.name} but not found"))
        else:
            items.append(Item(name, label, str(path)))
        seen.add(name)
    if items and all(it.problem for it in items):
        raise ShardError(f"{root}: none of the {len(items)} files named in {csv_path.name} exist "
                         f"(e.g. {items[0].file}); check SOURCE and --suffix")
    items.sort(key=lambda it: (it.label, it.file))
    return Source("csv", items, sorted(labels))


def scan_source(source: str, form: str = "auto", csv_path: str | None = None, id_column: str | None = None,
                label_column: str | None = None, suffix: str | None = None) -> Source:
    root = Path(source)
    form = detect_form(root, form, csv_path)
    if form == "folders":
        src = scan_folders(root)
    elif form == "imagenet-tar":
        src = scan_imagenet_tar(root)
    else:
        if csv_path is None:
            raise ShardError(f"{root}: --input csv needs --csv LABELS.csv")
        src = scan_csv(root, Path(csv_path), id_column, label_column, suffix)
    if not src.items:
        raise ShardError(f"{root}: no image files found; check SOURCE")
    return src
