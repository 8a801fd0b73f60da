"""The four input forms, each turned into a sorted list of :class:`Item` (file name, label, where its bytes are).

1. ``folders``: a class-folder tree ``ROOT/<class>/<file>`` (files may sit in sub-folders of the class).
   Each directory is walked once (by device and inode), so a symlink loop or a second link to a folder
   adds nothing; anything that is not a regular file (FIFO, socket, device, broken link) and any folder
   that cannot be listed is recorded as a reject. OUT and any shard directory (one with ``manifest.json``,
   ``.partial``, ``.lock`` or shard tars) are skipped, and a folder that holds nothing but OUT is no class.
2. ``imagenet-tar``: ``ILSVRC2012_img_train.tar``, a tar of per-class tars ``n01440764.tar`` (also a plain
   tar of class folders). Read in place: one pass over the headers records where each image's bytes are,
   workers then read them by offset. Nothing is unpacked to disk. A tar (outer or per-class) that does not
   end with its end-of-archive blocks, or whose headers are damaged, is refused: it is truncated or corrupt,
   and reading on would silently drop images or whole classes.
3. ``csv`` with ImageNet's ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``): the file is
   ``SOURCE/<ImageId>.JPEG`` and the label is the first token of PredictionString.
4. ``csv`` with named columns (Kaggle style): ``--id-column id --label-column species --suffix .jpg``.
   CSVs are read as UTF-8 (a byte-order mark is fine).

Items that are already known to be bad (unsafe tar paths, files listed in a CSV but absent, duplicates of
a name already listed, special files) carry a ``problem`` and end up in rejected.jsonl with the images that
fail to decode. Names are normalised (``./a`` is ``a``); of two items with one name the first is kept.
"""
from __future__ import annotations

import csv
import io
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .manifest import ShardError

INPUT_FORMS = ("auto", "folders", "imagenet-tar", "csv")
LOC_HEADER = ("ImageId", "PredictionString")
# Larger files are rejected unread: no photograph is this big, and the bytes are held in memory.
MAX_FILE_BYTES = 256 * 1024 * 1024
# What marks a directory as written by `python -m shards build` (docs/design.md section 1).
SHARD_DIR_MARKS = ("manifest.json", ".partial", ".lock")
SHARD_FILE = re.compile(r"^(train|val|test)-\d{6}\.(tar|idx)$")
_END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)


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
        # O_NONBLOCK: a FIFO swapped in after the scan must not hang the build; it is refused below.
        fd = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"not a regular file: {item.path}")
            if st.st_size > MAX_FILE_BYTES:
                raise OSError(f"{st.st_size} bytes, more than the {MAX_FILE_BYTES} an image may have")
            return f.read(st.st_size + 1)  # not MAX_FILE_BYTES: read(n) allocates n bytes up front
    if item.size > MAX_FILE_BYTES:
        raise OSError(f"{item.size} bytes, more than the {MAX_FILE_BYTES} an image may have")
    fd = _TAR_FDS.get(item.path)
    if fd is None:
        fd = _TAR_FDS[item.path] = os.open(item.path, os.O_RDONLY)
    data = os.pread(fd, item.size, item.offset)
    if len(data) != item.size:
        raise OSError(f"{item.path}: ends before byte {item.offset + item.size} (truncated tar)")
    return data


def normalise_name(name: str) -> str:
    """``./a//b`` -> ``a/b``: one spelling per file, so duplicates are found ('..' is kept, and refused)."""
    return PurePosixPath(name).as_posix() if name else name


def unsafe_member_name(name: str) -> str:
    """Why a tar member name (or a CSV id) must not be trusted ('' when it is fine)."""
    if "\x00" in name:
        return f"unsafe path (NUL byte): {name!r}"
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return f"unsafe tar member path (absolute): {name}"
    if ".." in PurePosixPath(name).parts:
        return f"unsafe tar member path (contains '..'): {name}"
    return ""


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except Exception:  # noqa: BLE001 - a hostile file may break a decompressor in any way: not a tar
        return False


def detect_form(source: Path, form: str, csv_path: str | None) -> str:
    if not source.exists():
        raise ShardError(f"{source}: SOURCE not found; pass a class-folder tree, an image folder with --csv, "
                         f"or ILSVRC2012_img_train.tar")
    if form != "auto":
        return form
    if csv_path is not None:
        return "csv"
    if source.is_file():
        if _is_tar(source):
            return "imagenet-tar"
        raise ShardError(f"{source}: a file but not a tar; pass a folder, or ILSVRC2012_img_train.tar")
    return "folders"


# ---------------------------------------------------------------- form 1: class folders

def _list_dir(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _is_shard_dir(entries: list[os.DirEntry]) -> bool:
    return any(e.name in SHARD_DIR_MARKS or SHARD_FILE.match(e.name) for e in entries)


def _holds(directory: str, out: str | None) -> bool:
    """True when ``directory`` (a real path) is OUT or one of its ancestors."""
    return out is not None and (directory == out or out.startswith(directory.rstrip(os.sep) + os.sep))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _class_of(real: str, class_reals: dict[str, str]) -> str | None:
    """The class whose folder (a real path) holds the real path ``real``, if any."""
    for folder, name in class_reals.items():
        if real == folder or real.startswith(folder.rstrip(os.sep) + os.sep):
            return name
    return None


def _walk_class(root: Path, name: str, seen_dirs: dict, class_reals: dict[str, str], out: str | None,
                items: list[Item]) -> None:
    """Every file under ``root/name``, depth first in name order (files of a folder, then its sub-folders),
    each directory once; what cannot be a sample is appended with its problem. A link to a folder inside
    another class is not followed: its images belong to that class."""
    seen_files: dict[tuple[int, int], str] = {}
    stack = [name]
    while stack:
        rel = stack.pop()
        try:
            entries = _list_dir(root / rel)
        except OSError as e:
            items.append(Item(rel, name, str(root / rel), problem=f"cannot list directory: {e.strerror or e}"))
            continue
        if rel != name and _is_shard_dir(entries):
            continue  # shards written inside a class folder are not images of that class
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child, full = f"{rel}/{entry.name}", root / rel / entry.name
            try:
                st = os.stat(full)  # follows links: a link to an image is an image
            except OSError as e:
                why = "broken symlink" if entry.is_symlink() else f"cannot stat: {e.strerror or e}"
                items.append(Item(child, name, str(full), problem=why))
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((child, full, (st.st_dev, st.st_ino)))
            elif not stat.S_ISREG(st.st_mode):
                items.append(Item(child, name, str(full), problem=f"{_kind(st.st_mode)}, not an image file"))
            elif (st.st_dev, st.st_ino) in seen_files:
                items.append(Item(child, name, str(full),
                                  problem=f"the same file as {seen_files[st.st_dev, st.st_ino]} (a link)"))
            else:
                seen_files[st.st_dev, st.st_ino] = child
                items.append(Item(child, name, str(full)))
        walk_next = []
        for child, full, ident in subdirs:
            if ident in seen_dirs:
                items.append(Item(child, name, str(full), problem=f"directory already walked as "
                                  f"{seen_dirs[ident]} (a symlink loop or a second link): skipped"))
                continue
            real = os.path.realpath(full)
            if _holds(real, out):
                continue
            owner = _class_of(real, class_reals)
            if owner is not None and owner != name:
                items.append(Item(child, name, str(full), problem=f"a link into class folder {owner}: skipped"))
                continue
            seen_dirs[ident] = child
            walk_next.append(child)
        stack.extend(reversed(walk_next))


def scan_folders(root: Path, out: str | os.PathLike | None = None) -> Source:
    if not root.is_dir():
        raise ShardError(f"{root}: not a directory; --input folders needs ROOT/<class>/<file>")
    out_real = os.path.realpath(out) if out is not None else None
    try:
        top = _list_dir(root)
    except OSError as e:
        raise ShardError(f"{root}: cannot list SOURCE ({e.strerror or e}); check its permissions") from None
    root_st = root.stat()
    seen_dirs: dict[tuple[int, int], str] = {(root_st.st_dev, root_st.st_ino): "."}
    items: list[Item] = []
    class_names = []
    loose = False
    for entry in top:
        if entry.name.startswith("."):
            continue
        full = root / entry.name
        try:
            st = os.stat(full)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            loose = True
            continue
        if os.path.realpath(full) == out_real:
            continue  # OUT inside SOURCE: never a class
        try:
            if _is_shard_dir(_list_dir(full)):
                continue  # another split's shards kept beside the images
        except OSError:
            pass  # recorded below, as the class's unreadable directory
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            items.append(Item(entry.name, "", str(full),
                              problem=f"the same directory as {seen_dirs[ident]} (a link): not a second class"))
            continue
        seen_dirs[ident] = entry.name
        class_names.append(entry.name)
    if not class_names:
        hint = " (it holds files: for a flat folder pass --csv LABELS.csv)" if loose else ""
        raise ShardError(f"{root}: no class folders found{hint}; expected ROOT/<class>/<image>")
    class_reals = {os.path.realpath(root / name): name for name in class_names}
    labels = []
    for name in class_names:
        before = len(items)
        _walk_class(root, name, seen_dirs, class_reals, out_real, items)
        if len(items) > before or not _holds(os.path.realpath(root / name), out_real):
            labels.append(name)  # a folder made only to hold OUT (SOURCE/_shards/train) is not a class
    return Source("folders", items, labels)


# ---------------------------------------------------------------- form 2: ILSVRC tars

class _Corrupt(Exception):
    """A tar that cannot be trusted as a whole; ``str(e)`` says where and why."""


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "a symlink"
    if m.islnk():
        return "a hard link"
    if m.isfifo():
        return "a FIFO"
    if m.ischr() or m.isblk():
        return "a device"
    return f"of type {m.type!r}"


def _read_members(tar: tarfile.TarFile, what: str, read_at, limit: int) -> list[tarfile.TarInfo]:
    """All members of ``tar``, after checking that its headers parse and that it ends with the two zero
    blocks of a complete tar. ``read_at(offset, n)`` reads the tar's own bytes; ``limit`` is its size."""
    try:
        members = list(tar)
    except Exception as e:  # noqa: BLE001 - tarfile raises many kinds on hostile headers
        raise _Corrupt(f"{what}: damaged tar header after byte {tar.offset} ({type(e).__name__}: {e})") from None
    end = tar.offset
    if end + len(_END_OF_ARCHIVE) > limit:
        raise _Corrupt(f"{what}: ends at byte {limit} without the end-of-archive blocks (truncated after "
                       f"{len(members)} members)")
    if read_at(end, len(_END_OF_ARCHIVE)) != _END_OF_ARCHIVE:
        raise _Corrupt(f"{what}: damaged tar header at byte {end} (corrupt, or cut and joined)")
    for m in members:
        if m.isreg() and m.offset_data + m.size > limit:
            raise _Corrupt(f"{what}: member {m.name!r} runs past the end of the tar (truncated)")
    return members


def scan_imagenet_tar(tar_path: Path) -> Source:
    items: list[Item] = []
    labels: set[str] = set()
    fix = "re-download it (or check it with `tar -tf`)"
    try:
        fd = os.open(tar_path, os.O_RDONLY)
    except OSError as e:
        raise ShardError(f"{tar_path}: cannot read ({e.strerror or e}); pass ILSVRC2012_img_train.tar") from None
    try:
        size = os.fstat(fd).st_size

        def read_at(offset: int, n: int) -> bytes:
            return os.pread(fd, n, offset)

        try:
            outer = tarfile.open(tar_path, mode="r:")  # noqa: SIM115 - closed by the `with` below
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"{tar_path}: cannot read as a tar ({e}); pass ILSVRC2012_img_train.tar") from None
        with outer:
            for member in _read_members(outer, str(tar_path), read_at, size):
                name = normalise_name(member.name)
                problem = unsafe_member_name(name)
                if member.isdir():
                    continue
                if problem or not member.isreg() or member.issparse():
                    if not problem:
                        problem = ("sparse tar member: skipped" if member.isreg()
                                   else f"tar member is {_member_kind(member)}, not a file: skipped")
                    items.append(Item(name, "", str(tar_path), problem=problem))
                    continue
                parts = PurePosixPath(name).parts
                if name.endswith(".tar"):
                    label = PurePosixPath(name).stem
                    labels.add(label)
                    items.extend(_scan_inner_tar(outer, member, name, label, tar_path, read_at))
                elif len(parts) >= 2:  # a plain tar of class folders: <class>/<file>
                    label = parts[0]
                    labels.add(label)
                    items.append(Item(name, label, str(tar_path), member.offset_data, member.size))
                else:
                    items.append(Item(name, "", str(tar_path),
                                      problem="tar member is neither a per-class tar nor inside a class folder"))
    except _Corrupt as e:
        raise ShardError(f"{e}; {fix}") from None
    except OSError as e:
        raise ShardError(f"{tar_path}: cannot read ({e.strerror or e}); {fix}") from None
    finally:
        os.close(fd)
    items = _first_of_each_name(items, "the same name is earlier in the tar")
    items.sort(key=lambda it: (it.label, it.file))
    return Source("imagenet-tar", items, sorted(labels))


def _scan_inner_tar(outer: tarfile.TarFile, member: tarfile.TarInfo, name: str, label: str, tar_path: Path,
                    read_at) -> list[Item]:
    where = f"{tar_path}: {name}"
    base = member.offset_data
    try:
        inner = tarfile.open(fileobj=outer.extractfile(member), mode="r:")  # noqa: SIM115 - `with` below
    except Exception as e:  # noqa: BLE001
        raise _Corrupt(f"{where}: not a readable per-class tar ({e})") from None
    out = []
    with inner:
        for m in _read_members(inner, where, lambda offset, n: read_at(base + offset, n), member.size):
            if m.isdir():
                continue
            file = f"{label}/{normalise_name(m.name)}"
            problem = unsafe_member_name(m.name)
            if not problem and (not m.isreg() or m.issparse()):
                problem = ("sparse tar member: skipped" if m.isreg()
                           else f"tar member is {_member_kind(m)}, not a file: skipped")
            if problem:
                out.append(Item(file, label, str(tar_path), problem=problem))
            else:
                out.append(Item(file, label, str(tar_path), base + m.offset_data, m.size))
    return out


def _first_of_each_name(items: list[Item], why: str) -> list[Item]:
    """Keep the first item of each file name; later ones become rejects (a name is one sample)."""
    seen, out = set(), []
    for it in items:
        if it.file in seen and not it.problem:
            it = Item(it.file, it.label, it.path, problem=f"duplicate: {why}")
        seen.add(it.file)
        out.append(it)
    return out


# ---------------------------------------------------------------- forms 3-4: CSV

def read_csv_rows(csv_path: Path) -> list[list[str]]:
    """The CSV's rows as text: UTF-8 with or without a byte-order mark; anything else is one line of error."""
    try:
        raw = csv_path.read_bytes()
    except OSError as e:
        raise ShardError(f"{csv_path}: cannot read ({e.strerror or e}); pass a readable labels CSV") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ShardError(f"{csv_path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         f"save the CSV as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return list(reader)
    except csv.Error as e:
        raise ShardError(f"{csv_path}:{reader.line_num}: {e}; fix the CSV") from None


def scan_csv(root: Path, csv_path: Path, id_column: str | None, label_column: str | None,
             suffix: str | None) -> Source:
    if not root.is_dir():
        raise ShardError(f"{root}: not a directory; with --csv, SOURCE is the folder holding the images")
    if not csv_path.is_file():
        raise ShardError(f"{csv_path}: CSV file not found; pass the labels file with --csv")
    rows = read_csv_rows(csv_path)
    header = rows.pop(0) if rows else None
    if not header:
        raise ShardError(f"{csv_path}: empty CSV; expected a header row")
    header = [h.strip() for h in header]
    loc = tuple(header[:2]) == LOC_HEADER and id_column is None and label_column is None
    if loc:
        id_idx, label_idx, suffix = 0, 1, ".JPEG" if suffix is None else suffix
    else:
        if id_column is None or label_column is None:
            raise ShardError(f"{csv_path}: header {','.join(header)!r} is not ImageNet's "
                             f"{','.join(LOC_HEADER)}; name the columns with --id-column and --label-column")
        for col in (id_column, label_column):
            if col not in header:
                raise ShardError(f"{csv_path}: no column {col!r} (columns: {', '.join(map(repr, header))}); "
                                 f"fix --id-column / --label-column")
        id_idx, label_idx, suffix = header.index(id_column), header.index(label_column), suffix or ""
    items, labels, seen = [], set(), {}
    for line_no, row in enumerate(rows, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(id_idx, label_idx):
            raise ShardError(f"{csv_path}:{line_no}: row has {len(row)} fields, expected {len(header)}; fix the CSV")
        image_id = row[id_idx].strip()
        label = row[label_idx].split()[0] if loc and row[label_idx].split() else row[label_idx].strip()
        if not label:
            raise ShardError(f"{csv_path}:{line_no}: empty label for {image_id!r}; fix the CSV")
        name = normalise_name(f"{image_id}{suffix}")
        labels.add(label)
        path = root / name if "\x00" not in name else root
        if not image_id:
            items.append(Item(name, label, str(path), problem=f"empty id in CSV line {line_no}"))
        elif unsafe_member_name(name):
            items.append(Item(name, label, str(path), problem=f"unsafe id in CSV: {image_id!r}"))
        elif name in seen:
            items.append(Item(name, label, str(path),
                              problem=f"duplicate id in CSV line {line_no} (line {seen[name]} is kept)"))
        else:
            items.append(_csv_item(name, label, path, csv_path))
        seen.setdefault(name, line_no)
    if items and all(it.problem for it in items):
        raise ShardError(f"{root}: none of the {len(items)} files named in {csv_path.name} exist "
                         f"(e.g. {items[0].file}); check SOURCE and --suffix")
    items.sort(key=lambda it: (it.label, it.file))
    return Source("csv", items, sorted(labels))


def _csv_item(name: str, label: str, path: Path, csv_path: Path) -> Item:
    try:
        st = os.stat(path)
    except OSError:
        return Item(name, label, str(path), problem=f"listed in {csv_path.name} but not found")
    if not stat.S_ISREG(st.st_mode):
        return Item(name, label, str(path), problem=f"listed in {csv_path.name} but {_kind(st.st_mode)}")
    return Item(name, label, str(path))


def scan_source(source: str, form: str = "auto", csv_path: str | None = None, id_column: str | None = None,
                label_column: str | None = None, suffix: str | None = None,
                out: str | os.PathLike | None = None) -> Source:
    """``out``: the build's OUT, which is never read as input even when it lies inside SOURCE."""
    root = Path(source)
    form = detect_form(root, form, csv_path)
    if form == "folders":
        src = scan_folders(root, out)
    elif form == "imagenet-tar":
        src = scan_imagenet_tar(root)
    else:
        if csv_path is None:
            raise ShardError(f"{root}: --input csv needs --csv LABELS.csv")
        src = scan_csv(root, Path(csv_path), id_column, label_column, suffix)
    if not src.items:
        raise ShardError(f"{root}: no image files found; check SOURCE")
    return src
