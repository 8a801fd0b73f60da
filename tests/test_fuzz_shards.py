"""Property-based fuzzing of ``python -m shards build`` with Hypothesis: ILSVRC tars (outer and per-class
tars, their headers and members), class-folder trees with links and special files, and CSV bytes.

Each generated input goes through ``shards.__main__.main(argv)`` in this process. Properties, for every case:

- the exit status is 0 or 2 (a refusal is a one-line ``error:``), never an uncaught exception;
- nothing is written outside OUT;
- Python allocations stay under ``PEAK_BYTES`` (tracemalloc) whatever sizes the input claims;
- when the build succeeds, ``verify`` accepts OUT and every stored sample is right: its label is the one its
  source gives it and its image is the source file's bytes (or, re-encoded, its size), found by an
  independent reading of the input (``tarfile`` extraction, plain ``open``, the ``csv`` module).

Inputs built from intact parts must also give exactly the expected samples. The images are crops of a
real photograph (scikit-image's ``astronaut``). Example counts and the seed come from the Hypothesis
profile (tests/conftest.py): fixed in CI, ``make fuzz`` for many more.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import tracemalloc
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np
from hypothesis import event, example, given
from hypothesis import strategies as st
from PIL import Image

from shards.__main__ import main
from shards.images import MIN_SIDE
from shards.manifest import load_classes, load_manifest
from shards.verify import verify

PEAK_BYTES = 64 << 20
# tmpfs when there is one: every build fsyncs its files, which is the slow part of a case on a disk
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
KEPT = ("jpeg", "grey", "png16")                 # kinds of content a build keeps
KINDS = KEPT + ("tiny", "truncated", "garbage", "empty")


# ---------------------------------------------------------------- content

def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


_POOL: dict[str, list[bytes]] = {}


def pool() -> dict[str, list[bytes]]:
    """A few files of each kind, cut from a real photograph (made once; a plain function, not a fixture, so
    that Hypothesis does not print it with every failing case)."""
    if _POOL:
        return _POOL
    import skimage.data

    photo = skimage.data.astronaut()
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(4):
        h, w = (int(v) for v in rng.integers(MIN_SIDE, 40, size=2))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        crops.append(Image.fromarray(np.ascontiguousarray(photo[y:y + h, x:x + w])))
    jpegs = [_encode(c, "JPEG") for c in crops]
    _POOL.update({
        "jpeg": jpegs,
        "grey": [_encode(c.convert("L"), "JPEG") for c in crops],
        "png16": [_encode(Image.fromarray(np.asarray(c.convert("L"), dtype=np.uint16) * 257), "PNG") for c in crops],
        "tiny": [_encode(c.resize((s, s)), "JPEG") for c, s in zip(crops, (1, 2, MIN_SIDE - 1, 3))],
        "truncated": [j[: len(j) // 2] for j in jpegs],
        "garbage": [bytes(rng.integers(0, 256, size=n, dtype=np.uint8)) for n in (1, 100, 700, 3000)],
        "empty": [b""],
    })
    return _POOL


contents = st.tuples(st.sampled_from(KEPT * 2 + KINDS), st.integers(0, 3))  # kept kinds half the time


def content(c: tuple[str, int]) -> bytes:
    kind, i = c
    return pool()[kind][i % len(pool()[kind])]


# ---------------------------------------------------------------- the harness

def _listing(root: Path, out_dir: Path) -> dict[str, tuple]:
    """Every path under root but OUT and the folders above it (a build may create those): mode, and for
    files size and mtime."""
    above = set(out_dir.parents)
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != out_dir]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path in above:
                continue
            st_ = os.lstat(path)  # a link is a file here, whatever it points at
            found[os.path.relpath(path, root)] = ((st_.st_mode,) if stat.S_ISDIR(st_.st_mode) else
                                                  (st_.st_mode, st_.st_size, st_.st_mtime_ns))
    return found


@contextmanager
def case_dir():
    d = Path(tempfile.mkdtemp(prefix="fuzz-", dir=SCRATCH))
    try:
        yield d
    finally:
        for p in d.rglob("*"):  # a fuzzed tree may hold unreadable folders
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(d)


def run_build(case: Path, out: Path, argv: list[str]) -> int:
    """``main(build ...)`` with the per-case properties that hold whatever the outcome; returns the code."""
    before = _listing(case, out)
    tracemalloc.start()
    try:
        code = main(["build", *argv, str(out), "--split", "train", "--max-count", "3", "--quiet"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code in (0, 2)
    event(f"exit {code}")  # the outcome mix, shown by --hypothesis-show-statistics
    assert peak < PEAK_BYTES, f"{peak} bytes allocated"
    assert _listing(case, out) == before, "the build changed files outside OUT"
    if code == 0:
        assert verify(out, progress=False) == []
    else:
        assert not (out / "manifest.json").exists()
    return code


def stored(out: Path) -> list[tuple[str, str, bytes, int, int]]:
    """``(file, label, jpg, width, height)`` of every sample, the label read through ``cls`` and classes.json."""
    classes = load_classes(out)
    result = []
    for shard in load_manifest(out)["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            parts: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                parts.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for p in parts.values():
            meta = json.loads(p["json"])
            assert classes[int(p["cls"])] == meta["label"]
            result.append((meta["file"], meta["label"], p["jpg"], meta["width"], meta["height"]))
    assert len({r[0] for r in result}) == len(result), "a file stored twice"
    return result


def same_image(jpg: bytes, source: bytes, width: int, height: int) -> bool:
    """The stored JPEG is the source itself (copy mode) or a re-encoding of it at its size."""
    if jpg == source:
        return True
    with Image.open(io.BytesIO(source)) as src:
        is_rgb_jpeg = src.format == "JPEG" and src.mode == "RGB"
        size = src.size
    return not is_rgb_jpeg and size == (width, height) == Image.open(io.BytesIO(jpg)).size


# ---------------------------------------------------------------- family 1: ILSVRC tars

names = st.sampled_from(["a.JPEG", "./a.JPEG", "b.JPEG", "c/d.JPEG", "../up.JPEG", "/abs.JPEG", "x" * 120 + ".JPEG",
                         "n.tar", "e.JPEG", "é.JPEG"])
member_types = st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                                                        tarfile.FIFOTYPE])
tar_formats = st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
members = st.lists(st.tuples(names, member_types, contents), min_size=0, max_size=4)
class_names = st.sampled_from(["n01440764", "n01443537", "n02123045", "./n01440764", "../n09999999", "a b"])
outer_extra = st.lists(st.tuples(st.sampled_from(["n02123045/f.JPEG", "n02123045/f.JPEG", "loose.JPEG",
                                                 "dir/n01443537.tar"]), contents), max_size=2)
mutations = st.one_of(  # intact half of the time: those cases must give exactly the expected samples
    st.none(), st.none(), st.none(), st.none(),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=1100)),
    st.tuples(st.just("drop_end"), st.integers(1, 1024)),
)


def _tar_bytes(entries: list[tuple[str, int, bytes]], fmt: int) -> bytes:
    if fmt == tarfile.USTAR_FORMAT and any(len(name) > 100 for name, _, _ in entries):
        fmt = tarfile.GNU_FORMAT  # ustar cannot hold the name
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, typ, data in entries:
            info = tarfile.TarInfo(name)
            info.type = typ
            if typ == tarfile.REGTYPE:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "a.JPEG" if typ in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                t.addfile(info)
    return buf.getvalue()


def _mutate(data: bytes, mutation) -> bytes:
    if mutation is None:
        return data
    kind = mutation[0]
    if kind == "truncate":
        return data[: int(mutation[1] * len(data))]
    if kind == "flip":
        at = min(int(mutation[1] * len(data)), len(data) - 1)
        return data[:at] + bytes([data[at] ^ mutation[2]]) + data[at + 1:]
    if kind == "append":
        return data + mutation[1]
    return data[: max(0, len(data) - mutation[1])]


def _truth_from_tar(path: Path) -> tuple[dict[str, tuple[str, bytes]], bool]:
    """file -> (label, bytes) of the first regular member of each name, read with tarfile's own extraction;
    and whether tarfile read the whole archive without complaint."""
    truth: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(path) as outer:
            for m in outer.getmembers():
                if not m.isreg():
                    continue
                name = PurePosixPath(m.name).as_posix()
                if name.endswith(".tar"):
                    label = PurePosixPath(name).stem
                    with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                        for im in inner.getmembers():
                            if im.isreg():
                                truth.setdefault(f"{label}/{PurePosixPath(im.name).as_posix()}",
                                                 (label, inner.extractfile(im).read()))
                elif len(PurePosixPath(name).parts) >= 2:
                    truth.setdefault(name, (PurePosixPath(name).parts[0], outer.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError):
        return truth, False
    return truth, True


@given(classes=st.lists(st.tuples(class_names, members, tar_formats), min_size=1, max_size=3),
       extra=outer_extra, fmt=tar_formats, mutation=mutations)
def test_fuzz_ilsvrc_tar(classes, extra, fmt, mutation):
    entries, expected = [], {}
    for cname, mems, inner_fmt in classes:
        inner = [(name, typ, content(c)) for name, typ, c in mems]
        entries.append((f"{cname}.tar", tarfile.REGTYPE, _tar_bytes(inner, inner_fmt)))
        label = PurePosixPath(f"{cname}.tar").stem
        for name, typ, c in mems:
            file = f"{label}/{PurePosixPath(name).as_posix()}"
            safe = ".." not in PurePosixPath(name).parts and not name.startswith("/") and ".." not in cname
            if typ == tarfile.REGTYPE and safe and file not in expected:
                expected[file] = c[0]
            elif typ != tarfile.DIRTYPE:  # a link or FIFO takes the name: a file of that name after it is a duplicate
                expected.setdefault(file, "dropped")
    for name, c in extra:
        entries.append((name, tarfile.REGTYPE, content(c)))
        if name.count("/") and not name.endswith(".tar"):
            expected.setdefault(name, c[0])
    not_a_tar = any(name.endswith(".tar") for name, _ in extra)  # a "class tar" holding an image
    with case_dir() as case:
        path = case / "ILSVRC2012_img_train.tar"
        path.write_bytes(_mutate(_tar_bytes(entries, fmt), mutation))
        out = case / "out"
        code = run_build(case, out, [str(path)])
        truth, whole = _truth_from_tar(path)
        kept_files = {f for f, kind in expected.items() if kind in KEPT}
        if mutation is None:
            assert code == (0 if kept_files and not not_a_tar else 2)
        if code == 0:
            assert whole, "a tar that tarfile cannot read whole was accepted"
            got = stored(out)
            for file, label, jpg, w, h in got:
                assert file in truth and truth[file][0] == label
                assert same_image(jpg, truth[file][1], w, h)
            if mutation is None:
                assert {g[0] for g in got} == kept_files


# ---------------------------------------------------------------- family 2: class-folder trees

entry_kinds = st.sampled_from(["file"] * 5 + ["dir", "link_dot", "link_up", "link_class", "link_sub", "link_file",
                                              "link_missing", "link_abs_file", "fifo", "hardlink", "hidden",
                                              "shard_dir", "unreadable"])
tree_ops = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), entry_kinds, contents), min_size=1, max_size=10)
out_places = st.sampled_from(["outside", "inside", "inside_precreated", "in_class"])


def _make_tree(src: Path, ops) -> dict[Path, str]:
    """Apply ops under src/<class>/...; return the regular files made (real path -> class), not hidden."""
    classes = ["a", "b c", "é"]
    made: dict[Path, str] = {}
    for ci, di, kind, c in ops:
        cls = classes[ci]
        folder = src / cls / ("" if di == 0 else f"sub{di}")
        folder.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.iterdir()))
        target = folder / f"e{n}.jpg"
        if kind == "file":
            target.write_bytes(content(c))
            made[target] = cls
        elif kind == "dir":
            (folder / f"d{n}").mkdir()
            (folder / f"d{n}" / "in.jpg").write_bytes(content(c))
            made[folder / f"d{n}" / "in.jpg"] = cls
        elif kind == "link_dot":
            os.symlink(".", folder / f"l{n}")
        elif kind == "link_up":
            os.symlink("..", folder / f"l{n}")
        elif kind == "link_class":
            os.symlink(os.path.relpath(src / classes[(ci + 1) % 3], folder), folder / f"l{n}")
        elif kind == "link_sub":
            os.symlink(os.path.relpath(src / classes[(ci + 1) % 3] / "sub1", folder), folder / f"l{n}")
        elif kind == "link_file":
            files = [p for p in made if p.parent == folder]
            if files:
                os.symlink(files[0].name, target)
        elif kind == "link_missing":
            os.symlink("nowhere.jpg", target)
        elif kind == "link_abs_file":
            outside = src.parent / f"outside{n}.jpg"
            outside.write_bytes(content(c))
            os.symlink(outside, target)
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "hardlink":
            files = [p for p in made if p.parent == folder]
            if files:
                os.link(files[0], target)
        elif kind == "hidden":
            (folder / f".h{n}.jpg").write_bytes(content(c))
        elif kind == "shard_dir":
            (folder / f"s{n}").mkdir()
            (folder / f"s{n}" / "manifest.json").write_text("{}")
            (folder / f"s{n}" / "train-000000.tar").write_bytes(content(c))
        elif kind == "unreadable":
            (folder / f"u{n}").mkdir()
            (folder / f"u{n}" / "in.jpg").write_bytes(content(c))
            made[folder / f"u{n}" / "in.jpg"] = cls
            (folder / f"u{n}").chmod(0)  # no effect as root; then an ordinary folder
    return made


@given(ops=tree_ops, place=out_places)
@example(ops=[(0, 0, "file", ("jpeg", 0)), (1, 0, "file", ("jpeg", 1))], place="in_class")  # found: class a lost
@example(ops=[(2, 0, "link_class", ("jpeg", 0))], place="in_class")  # found: OUT's parent made a link resolve
def test_fuzz_class_tree(ops, place):
    with case_dir() as case:
        src = case / "train"
        src.mkdir()
        made = _make_tree(src, ops)
        out = {"outside": case / "out", "inside": src / "_out", "inside_precreated": src / "_out",
               "in_class": src / "a" / "_out"}[place]
        if place == "inside_precreated":
            out.mkdir()
        code = run_build(case, out, [str(src)])
        if code != 0:
            return
        got = stored(out)
        reals = {}
        for file, label, jpg, w, h in got:
            path = src / file
            assert file.split("/")[0] == label
            assert not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(out))
            assert same_image(jpg, path.read_bytes(), w, h)
            real = (label, os.path.realpath(path))
            assert real not in reals, f"{file} and {reals[real]} are one file"
            reals[real] = file
        # every regular file made is accounted for: stored, or a reject that names it or a folder above it
        why = {json.loads(ln)["path"] for ln in (out / "rejected.jsonl").read_text().splitlines()}
        seen = {os.path.realpath(src / f) for f in [g[0] for g in got] + sorted(why)}
        for path in made:
            if not any(part.startswith(".") for part in path.relative_to(src).parts):
                real = os.path.realpath(path)
                assert real in seen or any(real.startswith(s + os.sep) for s in seen), path


# ---------------------------------------------------------------- family 3: CSV bytes

ids = st.sampled_from(["0", "1", "2", "./0", "sub/../1", "sub/3", "../x", "/etc/passwd", "", "missing", "fifo",
                       "link", " 1 ", "é"])
labels = st.sampled_from(["cat"] * 10 + ["dog"] * 10 + [" cat ", "n01440764 1 2 3 4", "é", '"q"', ""])
headers = st.sampled_from(["id,species"] * 3 + ["ImageId,PredictionString"] * 2 + ["species,id", "id;species", "",
                                                                                   "id"])
csv_mutations = st.one_of(st.none(), st.none(), st.none(),
                          st.sampled_from(["bom", "latin1", "nul", "crlf", "quote", "long"]),
                          st.tuples(st.just("bytes"), st.binary(max_size=20), st.floats(0, 1)))


def _csv_bytes(header: str, rows: list[tuple[str, str]], mutation) -> bytes:
    text = header + "\n" + "".join(f"{i},{lab}\n" if header != "species,id" else f"{lab},{i}\n" for i, lab in rows)
    data = text.encode()
    if mutation == "bom":
        data = b"\xef\xbb\xbf" + data
    elif mutation == "latin1":
        data = text.encode("utf-8", "replace").replace("é".encode(), b"\xe9") + b"0,caf\xe9\n"
    elif mutation == "nul":
        data = data.replace(b"cat", b"c\x00t")
    elif mutation == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif mutation == "quote":
        data = data + b'"unterminated,cat\n'
    elif mutation == "long":
        data = data + b"2," + b"d" * 140_000 + b"\n"
    elif mutation is not None:
        at = int(mutation[2] * len(data))
        data = data[:at] + mutation[1] + data[at:]
    return data


def _truth_from_csv(csv_path: Path, header_ok: bool) -> dict[str, str]:
    """file -> label of the first row naming each file, as the csv module reads it."""
    rows = list(csv.reader(io.StringIO(csv_path.read_bytes().decode("utf-8-sig"), newline="")))
    head = [h.strip() for h in rows[0]]
    loc = head[:2] == ["ImageId", "PredictionString"]
    id_i, lab_i = (0, 1) if loc else (head.index("id"), head.index("species"))
    truth: dict[str, str] = {}
    for row in rows[1:]:
        if not row or not any(c.strip() for c in row):
            continue
        name = PurePosixPath(row[id_i].strip() + (".JPEG" if loc else ".jpg")).as_posix()
        label = row[lab_i].split()[0] if loc else row[lab_i].strip()
        truth.setdefault(name, label)
    return truth


@given(rows=st.lists(st.tuples(ids, labels), min_size=1, max_size=8), header=headers, mutation=csv_mutations,
       files=st.lists(contents, min_size=4, max_size=4))
def test_fuzz_csv(rows, header, mutation, files):
    with case_dir() as case:
        folder = case / "images"
        (folder / "sub").mkdir(parents=True)
        for i, c in enumerate(files[:3]):
            data = content(c)
            (folder / f"{i}.jpg").write_bytes(data)
            (folder / f"{i}.JPEG").write_bytes(data)
        (folder / "sub" / "3.jpg").write_bytes(content(files[3]))
        os.mkfifo(folder / "fifo.jpg")
        os.symlink("0.jpg", folder / "link.jpg")
        csv_path = case / "labels.csv"
        csv_path.write_bytes(_csv_bytes(header, rows, mutation))
        out = case / "out"
        argv = [str(folder), "--csv", str(csv_path)]
        if header != "ImageId,PredictionString":
            argv += ["--id-column", "id", "--label-column", "species", "--suffix", ".jpg"]
        code = run_build(case, out, argv)
        if code != 0:
            return
        truth = _truth_from_csv(csv_path, True)
        for file, label, jpg, w, h in stored(out):
            assert truth[file] == label
            assert (folder / file).is_file()
            assert same_image(jpg, (folder / file).read_bytes(), w, h)
