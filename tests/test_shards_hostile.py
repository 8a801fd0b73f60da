"""``python -m shards build`` on hostile and unlucky input: each case is a real tree, tar or CSV made from
real photographs, and the real command (a subprocess where a hang, a signal or privileges matter, else
``shards.__main__.main`` in process). Every refusal must be one ``error:`` line with exit status 2.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from imagenet_like import (kill_build_after_first_shard, 
    blocking_build_argv,
    jpeg_bytes,
    write_class_tree,
    write_imagenet_train_tar,
)
from PIL import Image

from shards.__main__ import main
from shards.images import MIN_SIDE, EncodeConfig, Rejected, prepare_image
from shards.manifest import load_classes, load_manifest
from shards.sources import scan_source
from shards.tarfmt import ShardWriter

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run_cli(*args, timeout: float = 120, prefix: tuple = ()) -> subprocess.CompletedProcess:
    """``python -m shards ARGS`` in a subprocess: for runs that need their own privileges or may hang."""
    return subprocess.run([*prefix, sys.executable, "-m", "shards", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=timeout, check=False)


@pytest.fixture
def cli(capfd):
    """``python -m shards ARGS`` as ``main(ARGS)`` in this process (the imports paid once), with its
    stdout and stderr as a subprocess would give them."""
    def run(*args) -> subprocess.CompletedProcess:
        capfd.readouterr()
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run


def one_error_line(stderr: str) -> str:
    """The single line a refusal prints (asserting there is exactly one, and no traceback)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def samples(out: Path) -> list[dict]:
    names = [str(out / s["name"]) for s in load_manifest(out)["shards"]]
    return [{"cls": int(s["cls"]), "jpg": s["jpg"], "meta": json.loads(s["json"])}
            for s in wds.WebDataset(names, shardshuffle=False, empty_check=False)]


def rejected(out: Path) -> dict[str, str]:
    lines = (out / "rejected.jsonl").read_text().splitlines()
    return {json.loads(ln)["path"]: json.loads(ln)["reason"] for ln in lines}


def dir_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def crops() -> list[tuple[str, np.ndarray]]:
    """Three crops (80-300 px sides) of each of three scikit-image photographs, under real wnids."""
    import skimage.data

    from shards.sample_data import IMAGENET_WNIDS

    rng = np.random.default_rng(2)
    out = []
    for wnid, photo in zip(sorted(IMAGENET_WNIDS), (skimage.data.astronaut(), skimage.data.chelsea(),
                                                    skimage.data.coffee())):
        for _ in range(3):
            h, w = (int(rng.integers(80, min(300, side))) for side in photo.shape[:2])
            y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
            out.append((wnid, np.ascontiguousarray(photo[y:y + h, x:x + w, :3])))
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory, crops):
    return write_class_tree(tmp_path_factory.mktemp("hostile") / "train", crops, awkward=False)


def copy_tree(tree, dst: Path) -> Path:
    shutil.copytree(tree.root, dst, symlinks=True)
    return dst


def item_at(source: Path, position: int, seed: int = 3) -> str:
    """The file the build reads at ``position`` of its shuffled order (scan, sort, shuffle with --seed)."""
    items = list(scan_source(str(source)).items)
    random.Random(seed).shuffle(items)
    return items[position].file


def interrupted_build(source: Path, out: Path, *, stuck_at: int = 5) -> None:
    """``build SOURCE OUT --max-count 2 --seed 3`` killed (SIGKILL) while it waits on the file at shuffled
    position ``stuck_at``, so the shards before it are finished and the rest is not."""
    argv = blocking_build_argv(sys.executable, item_at(source, stuck_at),
                               ["build", source, out, "--split", "train", "--max-count", 2, "--seed", 3, "--quiet"])
    kill_build_after_first_shard(argv, out, ENV, REPO)


BUILD = ("--split", "train", "--max-count", 2, "--seed", 3, "--quiet")


# ---------------------------------------------------------------- OUT inside SOURCE, resume fingerprint

def test_out_inside_source_is_never_read(tree, tmp_path, cli):
    src = copy_tree(tree, tmp_path / "train")
    out = src / "_shards"
    interrupted_build(src, out)
    resumed = cli("build", src, out, *BUILD)
    assert resumed.returncode == 0, resumed.stderr
    assert load_classes(out) == tree.wnids
    assert sorted(s["meta"]["file"] for s in samples(out)) == sorted(tree.good)
    assert cli("verify", out, "--quiet").returncode == 0
    # A clean build elsewhere, with the finished shards still inside SOURCE, writes the same bytes; so does
    # one into a pre-created empty OUT inside SOURCE (no phantom class).
    clean = tmp_path / "clean"
    assert cli("build", src, clean, *BUILD).returncode == 0
    assert dir_bytes(clean) == dir_bytes(out)
    (src / "_empty").mkdir()
    assert cli("build", src, src / "_empty", *BUILD).returncode == 0
    assert dir_bytes(src / "_empty") == dir_bytes(out)
    # OUT inside a class folder: the class keeps its images, OUT is skipped
    in_class = src / tree.wnids[0] / "_out"
    assert cli("build", src, in_class, *BUILD).returncode == 0
    assert dir_bytes(in_class) == dir_bytes(out)


def test_resume_refuses_another_input(tree, tmp_path, cli):
    src = copy_tree(tree, tmp_path / "train")
    out = tmp_path / "out"
    interrupted_build(src, out)
    kept = sorted(p.name for p in out.iterdir() if p.name != ".lock")  # the killed build's lock file stays
    (src / "n09999999").mkdir()
    shutil.copy(next(src.glob("*/*_1.JPEG")), src / "n09999999" / "extra.JPEG")
    proc = cli("build", src, out, *BUILD)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert str(out) in line and "other input" in line and f"now {len(tree.good) + 1} files in 4 classes" in line
    assert sorted(p.name for p in out.iterdir()) == kept
    shutil.rmtree(src / "n09999999")  # the input as it was: the build resumes
    resumed = cli("build", src, out, *BUILD)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr


# ---------------------------------------------------------------- pixel formats and sizes

def _grey(crops) -> np.ndarray:
    return np.asarray(Image.fromarray(crops[0][1]).convert("L"))


@pytest.mark.parametrize("kind", ["png16", "tiff32", "tiff_float"])
def test_high_bit_depth_greyscale_is_scaled_not_clipped(crops, kind):
    grey = _grey(crops)
    img = {"png16": lambda: Image.fromarray(grey.astype(np.uint16) * 257),
           "tiff32": lambda: Image.fromarray(grey.astype(np.int32) * 257),
           "tiff_float": lambda: Image.fromarray(grey.astype(np.float32) / 255)}[kind]()
    buf = io.BytesIO()
    img.save(buf, format="PNG" if kind == "png16" else "TIFF")
    jpg, w, h = prepare_image(buf.getvalue(), EncodeConfig())
    stored = np.asarray(Image.open(io.BytesIO(jpg)).convert("L"), dtype=np.float32)
    assert (w, h) == grey.shape[::-1]
    assert np.abs(stored - grey).mean() < 3.0, np.abs(stored - grey).mean()


def test_16bit_png_in_a_build(crops, tree, tmp_path, cli):
    src = copy_tree(tree, tmp_path / "train")
    grey = _grey(crops)
    Image.fromarray(grey.astype(np.uint16) * 257).save(src / tree.wnids[0] / "deep.png")
    out = tmp_path / "out"
    assert cli("build", src, out, *BUILD).returncode == 0
    (deep,) = [s for s in samples(out) if s["meta"]["file"].endswith("deep.png")]
    stored = np.asarray(Image.open(io.BytesIO(deep["jpg"])).convert("L"), dtype=np.float32)
    assert np.abs(stored - grey).mean() < 3.0


def test_tiny_images_are_rejected_and_the_smallest_kept_one_loads_everywhere(crops, tree, tmp_path, cli):
    from pipeline import LoaderConfig, make_eval_loader, make_train_loader

    src = copy_tree(tree, tmp_path / "train")
    photo = Image.fromarray(crops[0][1])
    for w, h in ((1, 1), (MIN_SIDE - 1, 40), (MIN_SIDE, MIN_SIDE), (MIN_SIDE, 64)):
        photo.resize((w, h), Image.BICUBIC).save(src / tree.wnids[0] / f"tiny_{w}x{h}.JPEG", quality=92)
    out = tmp_path / "out"
    assert cli("build", src, out, "--split", "train", "--max-count", 4, "--quiet").returncode == 0
    why = rejected(out)
    assert set(why) == {f"{tree.wnids[0]}/tiny_1x1.JPEG", f"{tree.wnids[0]}/tiny_{MIN_SIDE - 1}x40.JPEG"}
    assert all("too small" in r for r in why.values())
    sizes = {(s["meta"]["width"], s["meta"]["height"]) for s in samples(out)}
    assert (MIN_SIDE, MIN_SIDE) in sizes and min(min(s) for s in sizes) == MIN_SIDE
    n = load_manifest(out)["num_samples"]
    for kind in ("dali", "reference"):
        for crop in ("paper", "rrc"):
            cfg = LoaderConfig(str(out), batch_size=4, image_size=32, resize_shorter=36, crop=crop,
                               num_workers=0, shuffle_buffer=8)
            got = [(images, labels) for images, labels in make_train_loader(cfg, kind=kind)]
            assert sum(len(labels) for _, labels in got) >= n - 3  # full batches only
            assert all(images.shape[1:] == (3, 32, 32) and bool(images.isfinite().all()) for images, _ in got)
        cfg = LoaderConfig(str(out), batch_size=4, image_size=32, resize_shorter=36, num_workers=0, ten_crop=True)
        assert sum(int(mask.sum()) for _, _, mask in make_eval_loader(cfg, kind=kind)) == n


def test_downscaling_below_the_minimum_side_is_rejected(crops):
    thin = io.BytesIO()
    Image.fromarray(crops[0][1]).resize((MIN_SIDE, 200)).save(thin, format="JPEG")
    with pytest.raises(Rejected, match="too small once downscaled"):
        prepare_image(thin.getvalue(), EncodeConfig(max_side=100))
    assert prepare_image(thin.getvalue(), EncodeConfig())[1:] == (MIN_SIDE, 200)


def _rewrite_sample_jpg(split: Path, jpg: bytes, width: int, height: int) -> None:
    """Put ``jpg`` in place of the first shard's first image (json, index and manifest to match): a split
    that an older build could have written."""
    tar = split / "train-000000.tar"
    with tarfile.open(tar) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    grouped: dict[str, list] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        grouped.setdefault(key, []).append((ext, data))
    first = next(iter(grouped))
    meta = json.loads(dict(grouped[first])["json"])
    meta.update(width=width, height=height)
    grouped[first] = [(e, jpg if e == "jpg" else json.dumps(meta).encode() if e == "json" else d)
                      for e, d in grouped[first]]
    with open(tar, "wb") as f:
        writer = ShardWriter(f)
        for key, parts in grouped.items():
            writer.write(key, parts)
        (split / "train-000000.idx").write_text(writer.close())
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][0].update(bytes=tar.stat().st_size, sha256=hashlib.sha256(tar.read_bytes()).hexdigest())
    (split / "manifest.json").write_text(json.dumps(manifest))


def test_a_stored_1x1_image_is_flagged_by_verify_and_still_loads(crops, tree, tmp_path, cli):
    from pipeline import LoaderConfig, make_train_loader

    out = tmp_path / "out"
    assert cli("build", tree.root, out, "--split", "train", "--quiet").returncode == 0
    _rewrite_sample_jpg(out, jpeg_bytes(crops[0][1][:1, :1]), 1, 1)
    proc = cli("verify", out, "--quiet")
    assert proc.returncode == 2 and f"under the {MIN_SIDE}-pixel minimum" in proc.stderr.splitlines()[-1]
    for kind in ("dali", "reference"):  # the paper crop's window is at least one pixel
        cfg = LoaderConfig(str(out), batch_size=3, image_size=32, resize_shorter=36, num_workers=0)
        assert sum(len(labels) for _, labels in make_train_loader(cfg, kind=kind)) == len(tree.good)


# ---------------------------------------------------------------- links, loops, special files

def test_symlink_loops_special_files_and_unreadable_folders(tree, tmp_path):
    src = copy_tree(tree, tmp_path / "train")
    a, b, c = tree.wnids
    os.symlink(".", src / a / "loop")
    os.symlink(f"../{b}", src / a / "other")
    os.mkfifo(src / a / "pipe.JPEG")
    os.symlink("missing.JPEG", src / a / "dangling.JPEG")
    os.symlink(f"{c}_1.JPEG", src / c / "z_alias.JPEG")  # a second name, later in walk order
    (src / c / "sub").mkdir()
    shutil.copy(src / a / f"{a}_1.JPEG", src / c / "sub" / "deep.JPEG")
    os.symlink(f"../{c}/sub", src / a / "into_c")  # its images are c's, not a's
    private = src / b / "private"
    private.mkdir()
    shutil.copy(src / b / f"{b}_1.JPEG", private / "hidden.JPEG")
    private.chmod(0)
    prefix = ()
    if os.geteuid() == 0:  # root reads any folder: drop the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a folder unreadable")
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    out = tmp_path / "out"
    try:
        proc = run_cli("build", src, out, *BUILD, timeout=60, prefix=prefix)
    finally:
        private.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    files = [s["meta"]["file"] for s in samples(out)]
    assert sorted(files) == sorted([*tree.good, f"{c}/sub/deep.JPEG"])
    why = rejected(out)
    expect = {f"{a}/loop": "already walked", f"{a}/other": "already walked", f"{a}/pipe.JPEG": "FIFO",
              f"{a}/dangling.JPEG": "broken symlink", f"{c}/z_alias.JPEG": "the same file",
              f"{b}/private": "cannot list directory", f"{a}/into_c": f"a link into class folder {c}"}
    assert set(why) == set(expect), why
    for path, words in expect.items():
        assert words in why[path], (path, why[path])


# ---------------------------------------------------------------- ILSVRC tars cut short or damaged

@pytest.fixture(scope="module")
def ilsvrc_tar(tree, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ilsvrc") / "ILSVRC2012_img_train.tar"
    write_imagenet_train_tar(tree, path, unsafe_members=False)
    return path


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def _end_of_members(data: bytes) -> int:
    last = _members(data)[-1]
    return last.offset_data + (last.size + 511) // 512 * 512


def _inner_cut(data: bytes) -> bytes:
    """The outer tar rebuilt with its second class tar cut after its first member (a valid outer tar)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for i, m in enumerate(src.getmembers()):
            inner = src.extractfile(m).read()
            if i == 1:
                inner = inner[:_members(inner)[1].offset]
            m.size = len(inner)
            dst.addfile(m, io.BytesIO(inner))
    return out.getvalue()


def _gnu_longname_then_garbage(data: bytes) -> bytes:
    """After the first class tar, a GNU long-name header whose real header is garbage (tarfile raises
    ReadError there, mid-archive)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as dst:
        info = tarfile.TarInfo("n" * 150 + ".tar")
        info.size = 0
        dst.addfile(info)
    long_link = out.getvalue()[:1024]  # the ././@LongLink header and its name block
    return data[:_members(data)[1].offset] + long_link + b"\x7f" * 512 + data[_members(data)[1].offset:]


CUTS = {
    "cut between members": lambda d: d[:_members(d)[1].offset],
    "cut inside a header": lambda d: d[:_members(d)[1].offset + 100],
    "cut inside a class tar": lambda d: d[:_members(d)[1].offset_data + 700],
    "no end-of-archive blocks": lambda d: d[:_end_of_members(d)],
    "garbage instead of the end blocks": lambda d: d[:_end_of_members(d)] + b"\x01" * 10240,
    "damaged header": lambda d: d[:_members(d)[1].offset + 3] + b"\xff" + d[_members(d)[1].offset + 4:],
    "class tar cut between members": _inner_cut,
    "GNU long name then a broken header": _gnu_longname_then_garbage,
}


@pytest.mark.parametrize("case", list(CUTS))
def test_truncated_or_damaged_ilsvrc_tar_is_refused_in_one_line(case, ilsvrc_tar, tmp_path, capsys):
    bad = tmp_path / ilsvrc_tar.name
    bad.write_bytes(CUTS[case](ilsvrc_tar.read_bytes()))
    out = tmp_path / "out"
    assert main(["build", str(bad), str(out), "--split", "train", "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(bad) in line and ("truncated" in line or "damaged" in line or "readable" in line), line
    assert not out.exists()


def test_the_intact_tar_builds(ilsvrc_tar, tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", str(ilsvrc_tar), str(out), "--split", "train", "--quiet"]) == 0
    assert sorted(s["meta"]["file"] for s in samples(out)) == sorted(tree.good)


# ---------------------------------------------------------------- duplicates

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_one_name_twice_in_a_class_tar_is_stored_once(crops, tmp_path, capsys):
    jpgs = [jpeg_bytes(p) for _, p in crops[:4]]
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as t:
        for name, data in (("a.JPEG", jpgs[0]), ("a.JPEG", jpgs[1]), ("./b.JPEG", jpgs[2]), ("b.JPEG", jpgs[3])):
            _add(t, name, data)
    path = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(path, "w") as t:
        _add(t, "n01440764.tar", inner.getvalue())
    out = tmp_path / "out"
    assert main(["build", str(path), str(out), "--split", "train", "--quiet"]) == 0
    got = {s["meta"]["file"]: s["jpg"] for s in samples(out)}
    assert got == {"n01440764/a.JPEG": jpgs[0], "n01440764/b.JPEG": jpgs[2]}
    rej = [json.loads(ln) for ln in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rej) == ["n01440764/a.JPEG", "n01440764/b.JPEG"]
    assert all("duplicate" in r["reason"] for r in rej)


def _kaggle(tmp_path: Path, crops, rows: list[str], encoding: str = "utf-8", bom: bool = False) -> tuple[Path, Path]:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i, (_, pixels) in enumerate(crops[:3]):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(pixels))
    csv_path = tmp_path / "train.csv"
    text = "id,species\n" + "".join(r + "\n" for r in rows)
    csv_path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return folder, csv_path


CSV_ARGS = ("--split", "train", "--id-column", "id", "--label-column", "species", "--suffix", ".jpg", "--quiet")


def test_a_csv_naming_one_file_twice_stores_it_once(crops, tmp_path, capsys):
    folder, csv_path = _kaggle(tmp_path, crops, ["0,cat", "./0,dog", "1,cat", "images/../1,dog", "2,dog"])
    out = tmp_path / "out"
    assert main(["build", str(folder), str(out), "--csv", str(csv_path), *CSV_ARGS]) == 0
    got = {s["meta"]["file"]: s["meta"]["label"] for s in samples(out)}
    assert got == {"0.jpg": "cat", "1.jpg": "cat", "2.jpg": "dog"}
    why = rejected(out)
    assert "duplicate id in CSV line 3 (line 2 is kept)" in why["0.jpg"] and "unsafe" in why["images/../1.jpg"]


# ---------------------------------------------------------------- CSV encodings and sizes

def test_a_csv_with_a_byte_order_mark_is_read(crops, tmp_path, capsys):
    folder, csv_path = _kaggle(tmp_path, crops, ["0,cat", "1,dog", "2,dog"], bom=True)
    out = tmp_path / "out"
    assert main(["build", str(folder), str(out), "--csv", str(csv_path), *CSV_ARGS]) == 0
    got = {s["meta"]["file"]: s["meta"]["label"] for s in samples(out)}
    assert got == {"0.jpg": "cat", "1.jpg": "dog", "2.jpg": "dog"}


@pytest.mark.parametrize("case", ["latin-1", "field over 128 KB"])
def test_unreadable_csv_is_one_line(case, crops, tmp_path, capsys):
    rows = {"latin-1": ["0,caf\u00e9", "1,dog"], "field over 128 KB": ["0,cat", "1," + "d" * 200_000]}[case]
    folder, csv_path = _kaggle(tmp_path, crops, rows, encoding="latin-1" if case == "latin-1" else "utf-8")
    out = tmp_path / "out"
    assert main(["build", str(folder), str(out), "--csv", str(csv_path), *CSV_ARGS]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{csv_path}:" in line and {"latin-1": "not UTF-8", "field over 128 KB": "field larger"}[case] in line
    assert not out.exists()


# ---------------------------------------------------------------- the disk fills up; two builds at once

@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs (root only), grown to 32 MiB by calling the returned function."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mnt, lambda: subprocess.run(["mount", "-o", "remount,size=32m", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_one_line_and_the_rerun_resumes(tree, tmp_path, small_disk, cli):
    mnt, grow = small_disk
    out = mnt / "out"
    proc = cli("build", tree.root, out, *BUILD)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "No space left on device" in line and "rerun the same command" in line
    assert not (out / "manifest.json").exists() and any(out.glob("train-*.tar"))
    grow()
    resumed = cli("build", tree.root, out, *BUILD)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    clean = tmp_path / "clean"
    assert cli("build", tree.root, clean, *BUILD).returncode == 0
    assert dir_bytes(out) == dir_bytes(clean)


def test_a_second_build_into_the_same_out_is_refused(tree, tmp_path, cli):
    src = copy_tree(tree, tmp_path / "train")
    out = tmp_path / "out"
    argv = blocking_build_argv(sys.executable, item_at(src, 5), ["build", src, out, *BUILD])
    first = subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / "train-000001.tar").exists():
            assert first.poll() is None
            time.sleep(0.05)
        second = cli("build", src, out, *BUILD)
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert "another build" in line and str(out) in line
        assert first.poll() is None and not (out / "manifest.json").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert cli("build", src, out, *BUILD).returncode == 0  # the lock died with its holder
    assert not (out / ".lock").exists()
