"""The sharder end to end on real photographs in ImageNet's layouts.

Every build here is the real command (``python -m shards`` in a subprocess, or ``build()`` in process
for the shared session fixtures) writing real tars that real WebDataset and DALI's wds2idx read back.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from imagenet_like import (Tree, blocking_build_argv, kill_build_after_first_shard, write_class_tree, write_flat_with_loc_csv,
                           write_imagenet_train_tar, write_kaggle_layout)
from shards.build import BuildConfig, build
from shards.images import EncodeConfig, target_size
from shards.manifest import ShardError, load_classes, load_manifest
from shards.sources import unsafe_member_name
from shards.tarfmt import split_name, tar_file_size

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, check: bool | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "shards", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120, **kw)
    if check is True:
        assert proc.returncode == 0, proc.stderr
    return proc


def read_samples(out: Path) -> list[dict]:
    """Every sample of a shard directory, in manifest order, read by WebDataset itself."""
    names = [str(out / s["name"]) for s in load_manifest(out)["shards"]]
    samples = []
    for s in wds.WebDataset(names, shardshuffle=False, empty_check=False):
        samples.append({"key": s["__key__"], "cls": int(s["cls"]), "jpg": s["jpg"],
                        "meta": json.loads(s["json"]), "shard": Path(s["__url__"]).name})
    return samples


def dir_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def last_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def crops():
    from shards.sample_data import photo_crops
    return photo_crops(per_class=5, n_classes=4, seed=1)


@pytest.fixture(scope="session")
def tree(tmp_path_factory, crops) -> Tree:
    return write_class_tree(tmp_path_factory.mktemp("imagenet") / "train", crops)


@pytest.fixture(scope="session")
def folder_build(tmp_path_factory, tree) -> Path:
    out = tmp_path_factory.mktemp("built") / "train"
    build(BuildConfig(str(tree.root), str(out), "train", max_count=4, seed=3, workers=2), progress=False)
    return out


# ---------------------------------------------------------------- form 1: class folders

def test_every_good_image_once_with_its_label(tree, folder_build):
    samples = read_samples(folder_build)
    assert Counter(s["meta"]["file"] for s in samples) == Counter({rel: 1 for rel in tree.good})
    classes = load_classes(folder_build)
    assert classes == tree.wnids  # sorted names -> 0..C-1, torchvision's ImageFolder order
    for s in samples:
        assert s["meta"]["label"] == tree.good[s["meta"]["file"]]
        assert classes[s["cls"]] == s["meta"]["label"]
        img = Image.open(io.BytesIO(s["jpg"]))
        img.load()
        assert (img.format, img.mode) == ("JPEG", "RGB")
        assert img.size == (s["meta"]["width"], s["meta"]["height"])
        source = (tree.root / s["meta"]["file"]).read_bytes()
        if s["meta"]["file"] in tree.reencoded:  # CMYK, greyscale, PNG named .JPEG: now RGB JPEG
            assert s["jpg"] != source
            assert img.size == Image.open(io.BytesIO(source)).size
        else:  # copy mode keeps an RGB JPEG's bytes
            assert s["jpg"] == source
    assert len({s["key"] for s in samples}) == len(samples)
    # Globally shuffled: far more label changes along the stream than a class-sorted order has.
    labels = [s["cls"] for s in samples]
    assert sum(a != b for a, b in zip(labels, labels[1:])) > 2 * len(classes)
    m = load_manifest(folder_build)
    assert [s["count"] for s in m["shards"]] == [4] * (len(samples) // 4) + ([len(samples) % 4] if len(samples) % 4 else [])
    assert m["num_samples"] == len(samples) and m["classes"] == classes
    described = {c["name"]: c["description"] for c in json.loads((folder_build / "classes.json").read_text())["classes"]}
    assert described["n01440764"] == "tench, Tinca tinca"


def test_rejects_listed_with_reasons(tree, folder_build):
    rejected = [json.loads(line) for line in (folder_build / "rejected.jsonl").read_text().splitlines()]
    by_path = {r["path"]: r["reason"] for r in rejected}
    assert set(by_path) == set(tree.bad)
    expect = {"zero_byte": "zero-byte", "text": "not an image", "truncated": "truncated"}
    for path, kind in tree.bad.items():
        assert expect[kind] in by_path[path], (path, by_path[path])
    assert load_manifest(folder_build)["rejected"] == len(tree.bad)


def test_index_files_are_what_dali_wds2idx_writes(folder_build, tmp_path):
    from wds2idx import IndexCreator

    for shard in load_manifest(folder_build)["shards"]:
        with IndexCreator(str(folder_build / shard["name"]), str(tmp_path / "ref.idx"), verbose=False) as ic:
            ic.create_index()
        assert (folder_build / shard["index"]).read_text() == (tmp_path / "ref.idx").read_text()


def test_dali_reads_the_shards_with_their_index(folder_build):
    from nvidia.dali import fn, pipeline_def

    m = load_manifest(folder_build)

    @pipeline_def(batch_size=m["num_samples"], num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(paths=[str(folder_build / s["name"]) for s in m["shards"]],
                                         index_paths=[str(folder_build / s["index"]) for s in m["shards"]],
                                         ext=["jpg", "cls"], missing_component_behavior="error")
        return fn.decoders.image(jpg, device="cpu"), cls

    pipe = read()
    pipe.build()
    images, cls = pipe.run()
    labels = sorted(int(bytes(cls.at(i))) for i in range(m["num_samples"]))
    assert labels == sorted(s["cls"] for s in read_samples(folder_build))
    assert all(images.at(i).shape[2] == 3 for i in range(m["num_samples"]))


# ---------------------------------------------------------------- determinism, resume, verify

def test_same_input_and_seed_give_identical_bytes(tree, folder_build, tmp_path):
    again = tmp_path / "train"  # other directory, one worker instead of two: same bytes
    run_cli("build", tree.root, again, "--split", "train", "--max-count", 4, "--seed", 3, "--quiet", check=True)
    assert dir_bytes(again) == dir_bytes(folder_build)
    other_seed = tmp_path / "seed4" / "train"
    run_cli("build", tree.root, other_seed, "--split", "train", "--max-count", 4, "--seed", 4, "--quiet", check=True)
    assert dir_bytes(other_seed)["train-000000.tar"] != dir_bytes(folder_build)["train-000000.tar"]
    assert sorted(s["meta"]["file"] for s in read_samples(other_seed)) == sorted(tree.good)
    # Rerunning a finished build changes nothing; other arguments into the same OUT are refused.
    before = {p.name: p.stat().st_mtime_ns for p in again.iterdir()}
    proc = run_cli("build", tree.root, again, "--split", "train", "--max-count", 4, "--seed", 3, check=True)
    assert "already complete" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == before
    proc = run_cli("build", tree.root, again, "--split", "train", "--max-count", 5, "--seed", 3)
    assert proc.returncode == 2 and "other arguments" in last_error_line(proc)


def test_resume_after_a_killed_run_is_byte_identical(tree, tmp_path):
    source = tmp_path / "train"
    shutil.copytree(tree.root, source)
    # A read that never returns (like a hung network mount) stops the run at a fixed point after some
    # shards are finished; then the process is killed outright.
    wnid = tree.wnids[-1]
    out = tmp_path / "out"
    cmd = ["build", source, out, "--split", "train", "--max-count", 2, "--seed", 3]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kill_build_after_first_shard(blocking_build_argv(sys.executable, f"{wnid}/{wnid}_2.JPEG", cmd), out, env, REPO)
    finished = sorted(p.name for p in out.glob("train-*.tar"))

    resumed = run_cli(*cmd, check=True)
    assert f"resuming: {len(finished)} finished shards kept" in resumed.stderr
    clean = tmp_path / "clean" / "train"
    shutil.move(source, tmp_path / "clean_src")
    (tmp_path / "clean_src").rename(tmp_path / "train")  # same SOURCE name, so the same recorded args
    run_cli("build", tmp_path / "train", clean, "--split", "train", "--max-count", 2, "--seed", 3, check=True)
    assert dir_bytes(out) == dir_bytes(clean)
    assert not (out / ".partial").exists()


def test_verify_catches_a_flipped_byte_and_a_missing_shard(folder_build, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(folder_build, out)
    ok = run_cli("verify", out, "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout

    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2048] ^= 0x01  # inside the first sample's JPEG data
    shard.write_bytes(bytes(data))
    bad = run_cli("verify", out, "--quiet")
    assert bad.returncode != 0 and "train-000001.tar" in last_error_line(bad)

    shutil.copy(folder_build / "train-000001.tar", shard)
    (out / "train-000002.tar").unlink()
    gone = run_cli("verify", out, "--quiet")
    assert gone.returncode != 0 and "train-000002.tar" in last_error_line(gone)
    assert "missing" in gone.stderr


def test_verify_catches_an_index_that_does_not_match(folder_build, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(folder_build, out)
    idx = out / "train-000000.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    bad = run_cli("verify", out, "--quiet")
    assert bad.returncode != 0 and "train-000000.idx" in bad.stderr


# ---------------------------------------------------------------- forms 2-4

def test_raw_imagenet_train_tar_read_in_place(tree, folder_build, tmp_path):
    tar = tmp_path / "ILSVRC2012_img_train.tar"
    unsafe = write_imagenet_train_tar(tree, tar)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "shards"
    run_cli("build", tar, out, "--split", "train", "--max-count", 4, "--seed", 3, "--workers", 2, "--quiet",
            check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "shards"])  # nothing unpacked
    from_tar = {s["meta"]["file"]: (s["meta"]["label"], s["cls"], s["jpg"]) for s in read_samples(out)}
    from_folders = {s["meta"]["file"]: (s["meta"]["label"], s["cls"], s["jpg"]) for s in read_samples(folder_build)}
    assert from_tar == from_folders
    rejected = {json.loads(line)["path"]: json.loads(line)["reason"]
                for line in (out / "rejected.jsonl").read_text().splitlines()}
    for name, wnid in unsafe.items():
        assert "unsafe tar member path" in rejected[f"{wnid}/{name}"]
    assert set(rejected) == set(tree.bad) | {f"{w}/{n}" for n, w in unsafe.items()}


def test_flat_val_with_loc_val_solution_csv(tree, folder_build, tmp_path):
    flat, csv_path = tmp_path / "val", tmp_path / "LOC_val_solution.csv"
    labels = write_flat_with_loc_csv(tree, flat, csv_path)
    out = tmp_path / "shards_val"
    run_cli("build", flat, out, "--split", "val", "--csv", csv_path, "--classes", folder_build / "classes.json",
            "--quiet", check=True)
    classes = load_classes(out)
    assert classes == load_classes(folder_build)
    got = {s["meta"]["file"]: classes[s["cls"]] for s in read_samples(out)}
    assert got == labels and len(got) == len(tree.good)
    assert all(k.startswith("val_") for k in (s["key"] for s in read_samples(out)))

    # A label train never had: refused, naming the label and the file.
    with open(csv_path, "a") as f:
        f.write("ILSVRC2012_val_99999999,n09999999 1 2 3 4\n")
    shutil.copy(flat / "ILSVRC2012_val_00000001.JPEG", flat / "ILSVRC2012_val_99999999.JPEG")
    proc = run_cli("build", flat, tmp_path / "refused", "--split", "val", "--csv", csv_path,
                   "--classes", folder_build / "classes.json")
    assert proc.returncode == 2
    line = last_error_line(proc)
    assert "n09999999" in line and "ILSVRC2012_val_99999999.JPEG" in line and "classes.json" in line
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused" / "manifest.json").exists()


def test_kaggle_layout_with_named_columns(tree, tmp_path):
    folder, csv_path = tmp_path / "images", tmp_path / "train.csv"
    labels = write_kaggle_layout(tree, folder, csv_path)
    out = tmp_path / "shards"
    run_cli("build", folder, out, "--split", "train", "--csv", csv_path, "--id-column", "id",
            "--label-column", "species", "--suffix", ".jpg", "--quiet", check=True)
    classes = load_classes(out)
    assert classes == sorted(set(labels.values()))
    got = {s["meta"]["file"]: classes[s["cls"]] for s in read_samples(out)}
    assert got == labels
    assert (out / "rejected.jsonl").read_text() == ""


# ---------------------------------------------------------------- options

def test_resize_mode_downscales_and_keeps_small_images(tree, tmp_path):
    out = tmp_path / "resized"
    run_cli("build", tree.root, out, "--split", "train", "--resize-shorter", 150, "--max-side", 200,
            "--quality", 80, "--workers", 2, "--quiet", check=True)
    kept = shrunk = 0
    for s in read_samples(out):
        img = Image.open(io.BytesIO(s["jpg"]))
        img.load()
        w, h = img.size
        assert (w, h) == (s["meta"]["width"], s["meta"]["height"]) and img.mode == "RGB"
        assert min(w, h) <= 150 and max(w, h) <= 200
        source = (tree.root / s["meta"]["file"]).read_bytes()
        sw, sh = Image.open(io.BytesIO(source)).size
        if min(sw, sh) <= 150 and max(sw, sh) <= 200 and s["meta"]["file"] not in tree.reencoded:
            assert s["jpg"] == source
            kept += 1
        else:
            assert min(w, h) == 150 or max(w, h) == 200
            shrunk += 1
    assert kept and shrunk


def test_max_size_bounds_every_shard_file(tree, tmp_path):
    out = tmp_path / "small"
    run_cli("build", tree.root, out, "--split", "train", "--max-size", 120_000, "--quiet", check=True)
    m = load_manifest(out)
    assert len(m["shards"]) > 2
    for s in m["shards"]:
        assert s["bytes"] == (out / s["name"]).stat().st_size <= 120_000


def test_strict_makes_a_reject_fatal(tree, tmp_path):
    proc = run_cli("build", tree.root, tmp_path / "strict", "--split", "train", "--strict", "--quiet")
    assert proc.returncode == 2
    line = last_error_line(proc)
    assert "--strict" in line and any(bad in line for bad in tree.bad)
    assert not (tmp_path / "strict" / "manifest.json").exists()
    # Dropping --strict in the same OUT starts over (no shard was finished) and skips the files instead.
    run_cli("build", tree.root, tmp_path / "strict", "--split", "train", "--quiet", check=True)
    assert load_manifest(tmp_path / "strict")["rejected"] == len(tree.bad)


@pytest.mark.parametrize("case", ["missing source", "out not empty", "csv without columns", "flat without csv",
                                  "bad option"])
def test_bad_input_is_one_line_error(case, tree, tmp_path):
    args = {
        "missing source": [tmp_path / "nope", tmp_path / "o", "--split", "train"],
        "out not empty": [tree.root, tree.root.parent, "--split", "train"],
        "csv without columns": [tmp_path, tmp_path / "o", "--split", "train", "--csv", tmp_path / "x.csv"],
        "flat without csv": [tree.root / "n01440764", tmp_path / "o", "--split", "train"],
        "bad option": [tree.root, tmp_path / "o", "--split", "train", "--quality", 0],
    }[case]
    (tmp_path / "x.csv").write_text("file,kind\na,b\n")
    proc = run_cli("build", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    expect = {"missing source": "SOURCE not found", "out not empty": "not empty",
              "csv without columns": "--id-column", "flat without csv": "--csv",
              "bad option": "--quality"}[case]
    assert expect in lines[0]


def test_load_manifest_errors_name_the_file(folder_build, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(folder_build, out)
    (out / "train-000001.idx").unlink()
    with pytest.raises(ShardError, match="train-000001.idx"):
        load_manifest(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json"):
        load_manifest(out)
    with pytest.raises(ShardError, match="not found"):
        load_classes(tmp_path / "nowhere")


# ---------------------------------------------------------------- small stages on plain values

def test_target_size_only_downscales():
    cfg = EncodeConfig(resize_shorter=256)
    assert target_size(500, 375, cfg) == (341, 256)
    assert target_size(200, 100, cfg) == (200, 100)
    assert target_size(1000, 500, EncodeConfig(max_side=400)) == (400, 200)
    assert target_size(1000, 900, EncodeConfig(resize_shorter=450, max_side=400)) == (400, 360)


def test_tar_names_and_sizes():
    assert split_name("dir/train_00000001.seg.png") == ("dir/train_00000001", "seg.png")
    assert unsafe_member_name("../x.JPEG") and unsafe_member_name("/etc/x.JPEG") and unsafe_member_name("a/../../b")
    assert unsafe_member_name("n01440764_1.JPEG") == ""
    assert tar_file_size(0) == 10240 and tar_file_size(10240 - 1024) == 10240 and tar_file_size(10240) == 20480


def test_config_rejects_bad_values_early():
    with pytest.raises(ValueError, match="--split"):
        BuildConfig("s", "o", "dev")
    with pytest.raises(ValueError, match="--max-count"):
        BuildConfig("s", "o", "train", max_count=0)
    with pytest.raises(ValueError, match="--resize-shorter"):
        BuildConfig("s", "o", "train", resize_shorter=2)


def test_digits_shards_fixture_is_what_other_stages_get(digits_shards):
    from shards.verify import verify

    train, val = load_manifest(digits_shards.train), load_manifest(digits_shards.val)
    assert (train["num_samples"], len(train["shards"])) == (1438, 5)
    assert (val["num_samples"], len(val["shards"])) == (359, 2)
    assert load_classes(digits_shards.val) == load_classes(digits_shards.train) == [f"digit_{d}" for d in range(10)]
    assert verify(digits_shards.train, progress=False) == [] and verify(digits_shards.val, progress=False) == []


def test_wnid_names_from_a_synset_file_beside_the_source(tree, tmp_path):
    source = tmp_path / "train"
    shutil.copytree(tree.root, source)
    (source / "n09999999").mkdir()
    shutil.copy(next(source.glob("*/*_1.JPEG")), source / "n09999999" / "n09999999_1.JPEG")
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} name of {w} from the file\n" for w in tree.wnids[1:]))
    out = tmp_path / "out"
    run_cli("build", source, out, "--split", "train", "--quiet", check=True)
    described = {c["name"]: c["description"] for c in json.loads((out / "classes.json").read_text())["classes"]}
    assert described[tree.wnids[0]] == "tench, Tinca tinca"                 # built-in table
    for w in tree.wnids[1:]:
        assert described[w] == f"name of {w} from the file"                 # the file wins
    assert described["n09999999"] == ""                                      # known nowhere
