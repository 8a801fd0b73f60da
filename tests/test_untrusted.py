"""Untrusted files: a checkpoint that carries pickled code is refused; tar members that would escape are rejected."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.manifest import ShardError
from tests.imagenet_like import jpeg_bytes
from trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


class TouchesAFile:
    """Unpickling this calls pathlib.Path.touch(marker): what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def evil_checkpoint(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "best.pt"
    torch.save({"model": {"fc8.bias": torch.zeros(10)}, "meta": {"classes": [str(i) for i in range(10)],
                                                                  "width": 0.25, "image_size": 64},
                "payload": TouchesAFile(marker)}, path)
    return path, marker


def test_the_evil_checkpoint_really_runs_code_when_loaded_without_weights_only(evil_checkpoint):
    path, marker = evil_checkpoint
    torch.load(path, weights_only=False)   # what the project never does
    assert marker.exists()


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_cli_refuses_a_checkpoint_with_pickled_objects_and_runs_none_of_it(evil_checkpoint, digits_shards, command,
                                                                          run_main):
    path, marker = evil_checkpoint
    image = next((digits_shards.raw / "val").rglob("*.jpg"))
    args = [str(image)] if command == "predict" else ["--data", str(digits_shards.val)]
    out = run_main("trainer", command, "--checkpoint", path, *args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: refused, it holds pickled Python objects (Unsupported global: GLOBAL getattr was not an "
        f"allowed global by default); checkpoints are loaded with weights_only=True and never run pickled code: "
        f"use a file written by `python -m trainer fit`"]
    assert out.stdout == "" and not marker.exists()


def test_a_training_state_in_a_ray_checkpoint_directory_is_loaded_weights_only(evil_checkpoint, tmp_path):
    """fit restores Ray Train checkpoints through the same ckpt.load (a directory means its checkpoint.pt)."""
    path, marker = evil_checkpoint
    directory = tmp_path / "checkpoint_000001"
    directory.mkdir()
    path.rename(directory / ckpt.TRAINING_STATE)
    with pytest.raises(ValueError, match="refused, it holds pickled Python objects"):
        ckpt.load(directory)
    assert not marker.exists()


# ---------------------------------------------------------------- the raw ImageNet tar

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _class_tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return buffer.getvalue()


@pytest.fixture
def hostile_train_tar(tmp_path):
    """An ILSVRC-style tar of per-class tars with names that point outside: in the outer and an inner tar."""
    rng = np.random.default_rng(0)
    jpeg = lambda: jpeg_bytes(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))  # noqa: E731
    path = tmp_path / "src" / "ILSVRC2012_img_train.tar"
    path.parent.mkdir()
    good = {f"n01440764_{i}.JPEG": jpeg() for i in range(3)}
    with tarfile.open(path, "w") as outer:
        _add(outer, "n01440764.tar", _class_tar({**good, "../../escape.JPEG": jpeg(), "/tmp/abs.JPEG": jpeg()}))
        _add(outer, "n01443537.tar", _class_tar({f"n01443537_{i}.JPEG": jpeg() for i in range(3)}))
        _add(outer, "../n09999999.tar", _class_tar({"n09999999_0.JPEG": jpeg()}))
        _add(outer, "/abs/n09999998.tar", _class_tar({"n09999998_0.JPEG": jpeg()}))
    return path


def test_tar_members_with_absolute_or_parent_paths_are_rejected_and_never_written(hostile_train_tar, tmp_path,
                                                                                 run_main):
    out = tmp_path / "out" / "train"
    result = run_main("shards", "build", hostile_train_tar, out, "--split", "train", "--quiet")
    assert result.returncode == 0, result.stderr
    rejected = {json.loads(line)["path"]: json.loads(line)["reason"]
                for line in (out / "rejected.jsonl").read_text().splitlines()}
    assert rejected == {
        "n01440764/../../escape.JPEG": "unsafe tar member path (contains '..'): ../../escape.JPEG",
        "n01440764//tmp/abs.JPEG": "unsafe tar member path (absolute): /tmp/abs.JPEG",
        "../n09999999.tar": "unsafe tar member path (contains '..'): ../n09999999.tar",
        "/abs/n09999998.tar": "unsafe tar member path (absolute): /abs/n09999998.tar",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["n01440764", "n01443537"] and manifest["num_samples"] == 6
    # the sharder streams members into shards: no member became a file anywhere
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert not written & {"escape.JPEG", "abs.JPEG", "n09999999.tar", "n09999998.tar"}
    assert not Path("/tmp/abs.JPEG").exists()


def test_strict_build_stops_at_an_unsafe_member_and_leaves_no_manifest(hostile_train_tar, tmp_path, run_main):
    out = tmp_path / "strict" / "train"
    result = run_main("shards", "build", hostile_train_tar, out, "--split", "train", "--strict", "--quiet")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unsafe tar member path" in lines[0], result.stderr
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------- model files: shape, meta and values

CLASSES = [f"digit_{i}" for i in range(10)]
META = {"classes": CLASSES, "width": 0.125, "image_size": 64, "resize_shorter": 73, "dropout": 0.5,
        "preset": "modern", "epoch": 0, "val_top1": 0.1, "val_top5": 0.5}


def model_file(path: Path, meta: dict | None = None, **changes) -> Path:
    """A model file the way fit writes it (width 0.125, 64 px, 10 classes), ``meta`` and tensors changed."""
    from trainer.model import AlexNet

    torch.manual_seed(0)
    state = ckpt.plain_state_dict(AlexNet(10, width=0.125, image_size=64))
    state.update(changes)
    torch.save({"model": state, "meta": {**META, **(meta or {})}}, path)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.full((80, 90, 3), 128, np.uint8)).save(path)
    return path


def cli(capsys, *argv) -> tuple[int, list[str], str]:
    """``python -m trainer ...`` in this process: exit code, stderr lines, stdout."""
    from trainer.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.err.strip().splitlines(), out.out


def test_a_valid_model_file_predicts(tmp_path, image, capsys):
    code, err, out = cli(capsys, "predict", "--checkpoint", model_file(tmp_path / "ok.pt"), image, "--json")
    assert code == 0 and err == []
    assert len(json.loads(out)["top5"]) == 5


BAD_MODEL_FILES = {   # id: (meta changes, tensor changes, the error after "error: PATH: ")
    "meta.width 64 (23.5 GB model)": ({"width": 64}, {}, "meta width 64 is not a number in (0, 8]"),
    "meta.width 0.5, weights of 0.125": ({"width": 0.5}, {}, "meta width 0.5 means layer widths [48, 128, 192, 192, "
                                         "128, 2048, 2048], the weights have [12, 32, 48, 48, 32, 512, 512]"),
    "meta.width a string": ({"width": "0.125"}, {}, "meta width '0.125' is not a number in (0, 8]"),
    "meta.width NaN": ({"width": float("nan")}, {}, "meta width nan is not a number in (0, 8]"),
    "meta.image_size 100000": ({"image_size": 100000}, {}, "meta image_size 100000 is not an integer in 63..1024"),
    "meta.image_size for other maps": ({"image_size": 224, "resize_shorter": 256}, {},
                                       "meta image_size 224 gives 6x6 maps into fc6, the weights are for 1x1"),
    "meta.image_size a bool": ({"image_size": True}, {}, "meta image_size True is not an integer in 63..1024"),
    "meta.resize_shorter 10**6": ({"resize_shorter": 10**6}, {},
                                  "meta resize_shorter 1000000 is not an integer in 64..2048 "
                                  "(image_size..2048)"),
    "meta.classes 3 for 10 outputs": ({"classes": ["a", "b", "c"]}, {},
                                      "meta lists 3 classes, fc8 has 10 outputs (at least 2 needed)"),
    "meta.classes not strings": ({"classes": list(range(10))}, {}, "meta classes is not a list of class names"),
    "meta.dropout 7": ({"dropout": 7}, {}, "meta dropout 7 is not a number in [0, 1)"),
    "fc6 inputs not a square map": ({}, {"fc6.weight": torch.zeros(512, 32 * 3)},
                                    "model entry fc6.weight has 96 inputs, not conv5's 32 maps times a square map "
                                    "size"),
    "fc7 shaped for another fc6": ({}, {"fc7.weight": torch.zeros(512, 256)},
                                   "model entry fc7.weight has shape (512, 256), expected (512, 512) for an AlexNet "
                                   "with the layer widths [12, 32, 48, 48, 32, 512, 512]"),
    "a layer missing": ({}, {"fc8.bias": None}, None),
    "zero-stride tensor claiming 4 GB": ({}, {"fc7.weight": torch.zeros(1).expand(32768, 32768)},
                                         "model entry fc7.weight claims 1073741824 elements but its storage holds "
                                         "4 bytes"),
    "integer weights": ({}, {"fc8.bias": torch.zeros(10, dtype=torch.int64)},
                        "model entry fc8.bias has dtype torch.int64, expected floating point"),
    "NaN weights": ({}, {"fc7.bias": torch.full((512,), float("nan"))},
                    "model entry fc7.bias holds NaN or infinite values (a diverged run); use an earlier checkpoint "
                    "of that run, e.g. RUN_DIR/best.pt"),
    "inf weights": ({}, {"conv1.weight": torch.full((12, 3, 11, 11), float("inf"))},
                    "model entry conv1.weight holds NaN or infinite values (a diverged run); use an earlier "
                    "checkpoint of that run, e.g. RUN_DIR/best.pt"),
}
FIX = "; use a file written by `python -m trainer fit`"


@pytest.mark.parametrize("case", BAD_MODEL_FILES, ids=list(BAD_MODEL_FILES))
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_model_file_is_checked_against_its_own_weights(case, command, tmp_path, image, digits_shards, capsys):
    meta, tensors, expected = BAD_MODEL_FILES[case]
    path = model_file(tmp_path / "m.pt", meta, **tensors)
    if tensors.get("fc8.bias", 0) is None:  # remove the layer instead
        obj = torch.load(path, weights_only=True)
        del obj["model"]["fc8.bias"]
        torch.save(obj, path)
        expected = "'model' is not an AlexNet state dict (missing ['fc8.bias'], unexpected nothing)"
    args = [image] if command == "predict" else ["--data", digits_shards.val, "--loader", "reference"]
    code, err, out = cli(capsys, command, "--checkpoint", path, *args)
    assert (code, out) == (2, "")
    assert err == [f"error: {path}: {expected}" + ("" if "NaN" in expected else FIX)]


@pytest.mark.parametrize("meta", [None, [1, 2], {"width": 0.125}, {k: v for k, v in META.items() if k != "classes"}],
                         ids=["meta None", "meta a list", "meta without classes", "meta without classes (2)"])
def test_missing_or_ill_typed_meta_is_one_line(meta, tmp_path, image, capsys):
    path = tmp_path / "m.pt"
    model_file(path)
    obj = torch.load(path, weights_only=True)
    obj["meta"] = meta
    torch.save(obj, path)
    code, err, _ = cli(capsys, "predict", "--checkpoint", path, image)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {path}: "), err
    assert ("meta has no 'classes'" in err[0]) if isinstance(meta, dict) else ("'meta' is a" in err[0])


def test_a_training_state_predicts_with_the_facts_of_its_config(tmp_path, image, capsys):
    """A Ray Train checkpoint's state (no 'meta'): width, image size and resize from its config, checked the same."""
    from trainer.config import Config

    cfg = Config()
    cfg.model.width, cfg.data.image_size = 0.125, 64
    obj = torch.load(model_file(tmp_path / "m.pt"), weights_only=True)
    state = {"model": obj["model"], "config": cfg.to_dict(), "classes": CLASSES, "epoch": 3}
    torch.save(state, tmp_path / ckpt.TRAINING_STATE)
    code, err, out = cli(capsys, "predict", "--checkpoint", tmp_path / ckpt.TRAINING_STATE, image, "--json")
    assert (code, err) == (0, []) and len(json.loads(out)["top5"]) == 5
    assert ckpt.model_meta(state)["resize_shorter"] == 73   # 0 in the config: 64 * 256 / 224
    cfg.model.width = 0.25
    torch.save({**state, "config": cfg.to_dict()}, tmp_path / ckpt.TRAINING_STATE)
    code, err, _ = cli(capsys, "predict", "--checkpoint", tmp_path / ckpt.TRAINING_STATE, image)
    assert code == 2 and err[0].startswith(f"error: {tmp_path / ckpt.TRAINING_STATE}: meta width 0.25 means layer ")
    del state["config"]["model"]
    torch.save(state, tmp_path / ckpt.TRAINING_STATE)
    code, err, _ = cli(capsys, "predict", "--checkpoint", tmp_path / ckpt.TRAINING_STATE, image)
    assert (code, err) == (2, [f"error: {tmp_path / ckpt.TRAINING_STATE}: neither 'meta' nor a complete training "
                                f"state ('classes' and a 'config' with model.width, model.dropout, data.image_size)"
                                f"{FIX}"])


def test_a_zero_byte_model_file_is_one_line(tmp_path, image, capsys):
    path = tmp_path / "empty.pt"
    path.touch()
    code, err, _ = cli(capsys, "predict", "--checkpoint", path, image)
    assert (code, err) == (2, [f"error: {path}: empty file (0 bytes){FIX}"])


def test_meta_cannot_make_the_process_allocate_beyond_its_tensors(tmp_path, image):
    """meta.width 8 on width-0.125 tensors asked for a 6 GB model: under a 3 GB address-space limit the
    command must answer with its one line, not an allocation failure."""
    import resource

    path = model_file(tmp_path / "w8.pt", {"width": 8})

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    out = subprocess.run([sys.executable, "-m", "trainer", "predict", "--checkpoint", str(path), str(image)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: meta width 8 means layer widths [768, 2048, 3072, 3072, 2048, 32768, 32768], the weights "
        f"have [12, 32, 48, 48, 32, 512, 512]{FIX}"]


# ---------------------------------------------------------------- every pickle variant is refused as such

class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


class PersistentIds(pickle.Pickler):
    def persistent_id(self, obj):
        return "payload" if obj == "x" else None


def pickled(kind: str, protocol: int) -> bytes:
    if kind == "reduce":
        return pickle.dumps({"model": RunsCode()}, protocol=protocol)
    if kind == "global":
        return pickle.dumps({"model": os.system}, protocol=protocol)
    buffer = io.BytesIO()
    PersistentIds(buffer, protocol=protocol).dump({"model": "x"})
    return buffer.getvalue()


def torch_saved(kind: str) -> bytes:
    buffer = io.BytesIO()
    payload = {"reduce": RunsCode(), "global": os.system}[kind.split("-")[-1]]
    torch.save({"model": payload}, buffer, _use_new_zipfile_serialization=not kind.startswith("legacy"))
    return buffer.getvalue()


PICKLES = {f"{kind} protocol {p}": (kind, p) for kind in ("global", "reduce", "persistent id") for p in range(6)}
PICKLES.update({f"torch.save {kind}": (kind, None)
                for kind in ("zip-reduce", "zip-global", "legacy-reduce", "legacy-global")})


@pytest.mark.parametrize("kind, protocol", PICKLES.values(), ids=list(PICKLES))
def test_every_pickle_variant_gets_the_refusal(kind, protocol, tmp_path, image, capsys):
    path = tmp_path / "best.pt"
    path.write_bytes(torch_saved(kind) if protocol is None else pickled(kind, protocol))
    code, err, out = cli(capsys, "predict", "--checkpoint", path, image)
    assert (code, out) == (2, "")
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {path}: refused, it holds pickled Python objects (")
    assert err[0].endswith("); checkpoints are loaded with weights_only=True and never run pickled code: use a "
                           "file written by `python -m trainer fit`")
    what = err[0].split("objects (", 1)[1].split("); checkpoints")[0]   # names what it would have run
    assert what.startswith("persistent id") if kind == "persistent id" else f"{os.system.__module__}.system" in what


def test_a_plain_pickle_without_code_is_not_called_code(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"model": {}}, protocol=4))
    with pytest.raises(ValueError, match=r"plain.pt: not a readable checkpoint \(UnpicklingError: "):
        ckpt.load(path)


# ---------------------------------------------------------------- manifest shard names, hostile shards

def shards_main(capsys, *argv) -> tuple[int, list[str]]:
    from shards.__main__ import main

    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def rewrite_manifest(split: Path, change) -> None:
    manifest = json.loads((split / "manifest.json").read_text())
    change(manifest)
    (split / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("field, name", [("name", "../outside.tar"), ("name", "ABSOLUTE"), ("index", "sub/x.idx"),
                                         ("name", ""), ("index", "..")])
def test_manifest_shard_names_that_leave_the_directory_are_refused(field, name, digits_shards, tmp_path, capsys):
    from pipeline.shardset import ShardSet

    split = tmp_path / "val"
    shutil.copytree(digits_shards.val, split)
    outside = tmp_path / "outside.tar"     # a real file the name would reach
    shutil.copy(split / "val-000000.tar", outside)
    name = str(outside) if name == "ABSOLUTE" else name
    rewrite_manifest(split, lambda m: m["shards"][0].__setitem__(field, name))
    expected = (f"{split}/manifest.json: shard 0 {field} {name[:80]!r} is not a plain file name inside the shard "
                f"directory; rebuild it with `python -m shards build SOURCE {split} --split ...`")
    with pytest.raises(ShardError) as e:
        ShardSet.open(split)
    assert str(e.value) == expected.replace(str(split), str(split.resolve()))
    assert shards_main(capsys, "verify", split, "--quiet") == (2, [f"error: {expected}"])


def test_a_manifest_shard_name_that_is_a_directory_is_one_line(digits_shards, tmp_path, capsys):
    from pipeline.shardset import ShardSet

    split = tmp_path / "val"
    shutil.copytree(digits_shards.val, split)
    (split / "val-000000.tar").unlink()
    (split / "val-000000.tar").mkdir()
    with pytest.raises(ShardError, match=r"val-000000.tar: listed in manifest.json as a file but is a directory; "):
        ShardSet.open(split)
    code, err = shards_main(capsys, "verify", split, "--quiet")
    assert code == 2 and len(err) == 1 and "val-000000.tar: a directory, not a file" in err[0], err


def test_verify_never_reads_a_members_declared_size_blindly(digits_shards, tmp_path, capsys):
    """A tar member whose header declares 1 TiB: verify reports it, it does not try to allocate it."""
    split = tmp_path / "val"
    shutil.copytree(digits_shards.val, split)
    info = tarfile.TarInfo("val_00000000.jpg")
    info.size = 1 << 40
    shard = split / "val-000000.tar"
    shard.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + b"\xff" * 4096)
    rewrite_manifest(split, lambda m: m["shards"][0].update(
        bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest()))
    code, err = shards_main(capsys, "verify", split, "--quiet")
    assert code == 2
    assert err == [f"error: {split}: 1 problem(s), first: val-000000.tar: member 'val_00000000.jpg' declares "
                   f"1099511627776 bytes, past the end of the 4608-byte tar; rebuild the split"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few bytes (its image data is empty)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 30_000], ids=["over the warning limit", "over the error limit"])
def test_predict_refuses_a_decompression_bomb_in_one_line(side, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(side, side))
    code, err, out = cli(capsys, "predict", "--checkpoint", model_file(tmp_path / "m.pt"), bomb)
    assert (code, out) == (2, "")
    assert len(err) == 1 and err[0].startswith(f"error: {bomb}: refused as a possible decompression bomb (Image "
                                               f"size ({side * side} pixels) exceeds limit of "), err


@pytest.mark.parametrize("where", ["/proc/x.png", "UNDER_A_FILE", "A_DIRECTORY"])
def test_preview_into_an_unwritable_place_is_one_line(where, digits_shards, tmp_path, capsys):
    from pipeline.__main__ import main

    (tmp_path / "notes.txt").write_text("mine")
    out = {"UNDER_A_FILE": tmp_path / "notes.txt" / "x.png", "A_DIRECTORY": tmp_path}.get(where, Path(where))
    code = main(["preview", str(digits_shards.train), "--out", str(out), "--loader", "reference", "--rows", "1",
                 "--cols", "2", "--batch-size", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --out {out}: cannot "), err
    assert err[0].endswith("; choose a writable path")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".part-" in p.name]
