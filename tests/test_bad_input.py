"""Bad input, table-driven: each case runs a real command and must fail with exactly one expected error line,
a non-zero exit, no traceback, and nothing written that a later run could take for valid output.

The broken inputs are real files: copies of the digits shards with one thing wrong (a truncated tar, a
sample without ``cls``, a label past the class count, a flipped byte, ...), checkpoints written the way
``fit`` writes them, and the session's local Ray cluster for the cases that need one.

Most cases call the command's ``main(argv)`` in this process (file descriptors 1 and 2 captured, as a
terminal would see them); one case per command runs ``python -m ...`` in a fresh interpreter, where a
warning printed while the command's modules import would break the one-line promise.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from shards.tarfmt import ShardWriter
from trainer.checkpoint import atomic_save
from trainer.config import SECTIONS, _field_types, build_config
from trainer.train import build_model, model_file

ROOT = Path(__file__).resolve().parents[1]
VALID_KEYS = ", ".join(f"{s}.{n}" for s in SECTIONS for n in _field_types(s))


# ---------------------------------------------------------------- making broken inputs

def copy_split(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_samples(split: Path, shard_name: str, change: Callable[[int, dict], None]) -> None:
    """Rewrite one tar with ``change(i, members)`` applied to each sample, with a matching index and manifest
    entry, so that the change is the only thing wrong with the split."""
    tar = split / shard_name
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as tf:
        for member in tf.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
    with open(tar, "wb") as f:
        writer = ShardWriter(f)
        for i, (key, members) in enumerate(samples.items()):
            change(i, members)
            writer.write(key, [(ext, members[ext]) for ext in ("cls", "jpg", "json") if ext in members])
        index = writer.close()
    tar.with_suffix(".idx").write_text(index)
    manifest = json.loads((split / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard_name:
            entry["bytes"] = tar.stat().st_size
            entry["sha256"] = hashlib.sha256(tar.read_bytes()).hexdigest()
    (split / "manifest.json").write_text(json.dumps(manifest, indent=1))


def model_checkpoint(path: Path, classes: list[str], width: float) -> Path:
    cfg = build_config(sets=[f"model.width={width}", "data.image_size=64"], need_data=False)
    atomic_save(model_file(build_model(cfg, len(classes)), cfg, classes,
                           {"epoch": 0, "val_top1": 0.1, "val_top5": 0.5}), path)
    return path


@dataclass
class World:
    """What the commands are pointed at: good and broken shard dirs, checkpoints, a Ray cluster."""
    tmp: Path
    train: Path
    val: Path
    paths: dict[str, Path] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)   # sizes, keys, hashes the messages quote

    def fmt(self, text: str) -> str:
        return text.format(tmp=self.tmp, train=self.train, val=self.val, **self.paths, **self.facts)


@pytest.fixture(scope="module")
def world(digits_shards, tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("bad")
    w = World(tmp, digits_shards.train, digits_shards.val)
    p = w.paths
    (tmp / "empty").mkdir()
    p["empty"] = tmp / "empty"

    p["truncated"] = copy_split(digits_shards.train, tmp / "truncated")
    shard = p["truncated"] / "train-000002.tar"
    w.facts["full"] = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    w.facts["half"] = shard.stat().st_size

    p["nocls"] = copy_split(digits_shards.train, tmp / "nocls")
    rewrite_samples(p["nocls"], "train-000001.tar", lambda i, m: m.pop("cls") if i == 7 else None)
    w.facts["nocls_key"] = (p["nocls"] / "train-000001.idx").read_text().splitlines()[8].split()[3].split(".")[0]

    p["badlabel"] = copy_split(digits_shards.train, tmp / "badlabel")  # every label 12, 10 classes
    for entry in json.loads((p["badlabel"] / "manifest.json").read_text())["shards"]:
        rewrite_samples(p["badlabel"], entry["name"], lambda i, m: m.__setitem__("cls", b"12"))

    p["otherval"] = copy_split(digits_shards.val, tmp / "otherval")  # same shards, one class renamed
    classes = json.loads((p["otherval"] / "classes.json").read_text())
    classes["classes"][3]["name"] = "digit_three"
    (p["otherval"] / "classes.json").write_text(json.dumps(classes))

    p["flipped"] = copy_split(digits_shards.val, tmp / "flipped")  # same size, one byte changed
    shard = p["flipped"] / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    w.facts["sha_now"] = hashlib.sha256(bytes(data)).hexdigest()[:12]
    w.facts["sha_manifest"] = json.loads((p["flipped"] / "manifest.json").read_text())["shards"][0]["sha256"][:12]

    classes = [e["name"] for e in json.loads((digits_shards.train / "classes.json").read_text())["classes"]]
    p["ckpt"] = model_checkpoint(tmp / "ckpt" / "best.pt", classes, width=0.125)
    p["ckpt5"] = model_checkpoint(tmp / "ckpt5" / "best.pt", classes[:5], width=0.125)
    p["notckpt"] = tmp / "notes.pt"
    p["notckpt"].write_text("these are my notes, not weights\n")
    p["notimage"] = tmp / "cat.jpg"
    p["notimage"].write_text("a text file with an image's name\n")

    p["oldrun"] = tmp / "oldrun"  # a run dir whose config says width 0.25
    p["oldrun"].mkdir()
    old = build_config(need_data=False)
    old.model.width, old.data.image_size = 0.25, 64
    (p["oldrun"] / "config.json").write_text(json.dumps({"config": old.to_dict(), "classes": classes}))
    p["splitrun"] = tmp / "splitrun"  # a run dir of FIT's settings but trained with --parallel model
    p["splitrun"].mkdir()
    old = build_config(sets=["model.width=0.125", "data.image_size=64", "run.parallel=model"], need_data=False)
    (p["splitrun"] / "config.json").write_text(json.dumps({"config": old.to_dict(), "classes": classes}))
    p["yaml"] = tmp / "typo.yaml"
    p["yaml"].write_text("train: {epochs: 2, batchsize: 64}\n")
    return w


# ---------------------------------------------------------------- the table

FIT = ["trainer", "fit", "--val", "{val}", "--out", "{tmp}/run", "--width", "0.125", "--set", "data.image_size=64"]
FIX = "rebuild the split with `python -m shards build` (check with `python -m shards verify {%s}`)"


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    expected: str                         # the one error line, formatted with World.fmt
    unwritten: tuple[str, ...] = ("{tmp}/run",)   # paths that must not exist afterwards
    ray: bool = False                     # join the session's Ray cluster (RAY_ADDRESS)
    fresh: bool = False                   # run `python -m ...` in a new interpreter (see the module docstring)


CASES = [
    Case("missing shard dir", [*FIT, "--train", "{tmp}/nowhere"],
         "error: data.train: {tmp}/nowhere is not a directory; build it with `python -m shards build`"),
    Case("empty shard dir", [*FIT, "--train", "{empty}"],
         "error: {empty}/manifest.json: not found; rebuild it with `python -m shards build SOURCE {empty} --split ...`"),
    Case("shard truncated mid-file", [*FIT, "--train", "{truncated}"],
         "error: {truncated}/train-000002.tar: truncated ({half} bytes, manifest.json says {full}); " + FIX % "truncated"),
    Case("sample without cls", [*FIT, "--train", "{nocls}"],
         "error: {nocls}/train-000001.tar: sample 7 ({nocls_key}) has no 'cls' component; every sample needs "
         "jpg+cls; rebuild the split with `python -m shards build` (or `python -m shards verify {nocls}`)"),
    Case("label >= number of classes", [*FIT, "--train", "{badlabel}", "--workers", "1", "--batch-size", "32",
                                        "--set", "run.max_failures=0", "--loader", "dali"],
         "error: {badlabel}/train-000003.tar, {badlabel}/train-000004.tar, {badlabel}/train-000001.tar: a sample has "
         "label 12, outside 0..9 (classes.json lists 10 classes); find it with `python -m shards verify {badlabel}` "
         "and rebuild the split", ray=True, unwritten=("{tmp}/run/last.pt", "{tmp}/run/best.pt")),
    Case("train and val classes.json disagree", [*FIT[:2], "--val", "{otherval}", *FIT[4:], "--train", "{train}"],
         "error: {otherval}/classes.json differs from {train}/classes.json; rebuild val with "
         "`python -m shards build ... --classes {train}/classes.json`"),
    Case("manifest sha256 mismatch", ["shards", "verify", "{flipped}", "--quiet"],
         "error: {flipped}: 2 problem(s), first: val-000000.tar: sha256 {sha_now}... differs from the manifest's "
         "{sha_manifest}...; rebuild the split", unwritten=()),
    Case("unknown config key", [*FIT, "--train", "{train}", "--set", "optim.momentun=0.9"],
         "error: --set: unknown config key(s) optim.momentun; valid keys: " + VALID_KEYS),
    Case("unknown key in a config file", [*FIT, "--train", "{train}", "--config", "{yaml}"],
         "error: --config {yaml}: unknown config key(s) train.batchsize; valid keys: " + VALID_KEYS),
    Case("zero batch size", [*FIT, "--train", "{train}", "--batch-size", "0"],
         "error: train.batch_size must be an integer >= 1, got 0"),
    Case("negative batch size", [*FIT, "--train", "{train}", "--batch-size", "-8"],
         "error: train.batch_size must be an integer >= 1, got -8"),
    Case("zero epochs", [*FIT, "--train", "{train}", "--epochs", "0"],
         "error: train.epochs must be an integer >= 1, got 0"),
    Case("NaN for a float key", [*FIT, "--train", "{train}", "--set", "run.cpus_per_worker=.nan"],
         "error: run.cpus_per_worker must be a finite number, got nan"),
    Case("negative seed", [*FIT, "--train", "{train}", "--set", "train.seed=-1"],
         "error: train.seed must be an integer >= 0, got -1"),
    Case("more workers than the cluster can place", [*FIT, "--train", "{train}", "--workers", "{too_many}",
                                                     "--batch-size", "{batch}", "--set", "run.placement_timeout_s=1"],
         "error: the Ray cluster can place {ray_cpus} of {too_many} workers needing {{CPU: 1}} each "
         "(live nodes: {{CPU: {ray_cpus}}}) after "
         "waiting 1 s (run.placement_timeout_s); lower --workers or run.cpus_per_worker / --gpus-per-worker, "
         "or add nodes", ray=True),
    Case("--parallel model with one device", [*FIT, "--train", "{train}", "--parallel", "model",
                                              "--gpus-per-worker", "1"],
         "error: --parallel model needs two devices per worker: --gpus-per-worker 2 (or 0 for two CPU columns), "
         "got 1.0"),
    Case("predict: not an image", ["trainer", "predict", "--checkpoint", "{ckpt}", "{notimage}"],
         "error: {notimage}: cannot read this image (UnidentifiedImageError); pass JPEG or PNG files", unwritten=(),
         fresh=True),
    Case("predict: no such image", ["trainer", "predict", "--checkpoint", "{ckpt}", "{tmp}/missing.jpg"],
         "error: {tmp}/missing.jpg: cannot read this image (FileNotFoundError); pass JPEG or PNG files", unwritten=()),
    Case("eval: checkpoint for a different class count", ["trainer", "eval", "--checkpoint", "{ckpt5}",
                                                           "--data", "{val}"],
         "error: {val}/classes.json differs from the classes stored in {ckpt5}; evaluate on shards built with the "
         "training run's classes.json", unwritten=()),
    Case("fit: RUN_DIR of a different width", [*FIT[:5], "{oldrun}", *FIT[6:], "--train", "{train}"],
         "error: {oldrun}/config.json: this RUN_DIR holds a run with different model.width; resume with the same "
         "settings or pass a new --out", unwritten=("{oldrun}/ray", "{oldrun}/metrics.jsonl"), fresh=True),
    Case("fit: RUN_DIR of another --parallel mode", [*FIT[:5], "{splitrun}", *FIT[6:], "--train", "{train}"],
         "error: {splitrun}/config.json: this RUN_DIR holds a run with different run.parallel; resume with the same "
         "settings or pass a new --out", unwritten=("{splitrun}/ray", "{splitrun}/metrics.jsonl")),
    Case("eval: not a checkpoint", ["trainer", "eval", "--checkpoint", "{notckpt}", "--data", "{val}"],
         "error: {notckpt}: not a readable checkpoint (IndexError: pop from empty list); use a file written by "
         "`python -m trainer fit`", unwritten=(), fresh=True),
    Case("shards build: SOURCE missing", ["shards", "build", "{tmp}/no-source", "{tmp}/out", "--split", "train"],
         "error: {tmp}/no-source: SOURCE not found; pass a class-folder tree, an image folder with --csv, "
         "or ILSVRC2012_img_train.tar", unwritten=("{tmp}/out/manifest.json",), fresh=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, case, request, monkeypatch, run_main):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if case.ray:
        import ray

        monkeypatch.setenv("RAY_ADDRESS", request.getfixturevalue("ray_cluster"))
        cpus = int(ray.cluster_resources()["CPU"])
        world.facts.update(ray_cpus=cpus, too_many=cpus + 2, batch=4 * (cpus + 2))   # a batch the workers divide
    argv = [world.fmt(a) for a in case.argv]
    shutil.rmtree(world.tmp / "run", ignore_errors=True)   # each case starts without a RUN_DIR
    if case.fresh:
        out = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=300)
    else:
        out = run_main(*argv)
    stdout, stderr = out.stdout, out.stderr
    assert out.returncode == 2, stderr[-3000:]
    # Ray streams its workers' logs (a worker's traceback included) with a "(RayTrainWorker pid=...)" prefix;
    # the command's own output is the rest
    own = [line for line in stderr.splitlines() if not re.match(r"^(\x1b\[\d+m)?\(", line)]
    assert not [line for line in own if "Traceback" in line], stderr[-3000:]
    errors = [line for line in own if line.startswith("error")]
    assert errors == [world.fmt(case.expected)], stderr[-3000:]
    assert stdout.strip() == "" or argv[0] == "trainer" and argv[1] == "fit"
    for path in case.unwritten:
        assert not Path(world.fmt(path)).exists(), path


def test_the_table_has_at_least_15_cases():
    assert len(CASES) >= 15 and len({c.id for c in CASES}) == len(CASES)
