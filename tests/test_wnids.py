"""ImageNet class names ship with the package: every ImageNet build names its classes without --synsets."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from imagenet_like import write_class_tree, write_imagenet_train_tar

from shards.build import BuildConfig, build
from shards.wnids import SHIPPED, imagenet_synsets

REPO = Path(__file__).resolve().parents[1]
# wnids the photographs of the test trees are filed under: none is among the few that sample_data names,
# so their names can only come from the shipped table; two pairs share a first name (crane, maillot)
WNIDS = {"n02012849": "crane", "n03126707": "crane",
         "n03710637": "maillot", "n03710721": "maillot, tank suit",
         "n15075141": "toilet tissue, toilet paper, bathroom tissue"}


def test_the_shipped_table_is_the_1000_ilsvrc_2012_classes_in_index_order():
    table = imagenet_synsets()
    wnids = list(table)
    assert len(wnids) == len(set(wnids)) == 1000
    assert wnids == sorted(wnids)                       # file order is the class index (sorted wnids)
    assert wnids[0] == "n01440764" and table["n01440764"] == "tench, Tinca tinca"
    assert wnids[-1] == "n15075141"
    assert wnids[409] == "n02708093" and table["n02708093"] == "analog clock"   # index 409 of the standard map
    assert wnids[134] == "n02012849" and wnids[517] == "n03126707"             # the bird and the machine
    assert all(name.strip() == name and name for name in table.values())
    assert {w: table[w] for w in WNIDS} == WNIDS


def class_tree(root: Path):
    from shards.sample_data import photo_crops

    crops = photo_crops(per_class=2, n_classes=len(WNIDS), seed=5)
    mapping = dict(zip(sorted({w for w, _ in crops}), WNIDS))      # file the photographs under our wnids
    return write_class_tree(root, [(mapping[w], pixels) for w, pixels in crops], awkward=False)


def descriptions(out: Path) -> dict[str, str]:
    return {c["name"]: c["description"] for c in json.loads((out / "classes.json").read_text())["classes"]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return class_tree(tmp_path_factory.mktemp("ilsvrc") / "train")


def test_an_ilsvrc_train_tar_build_names_every_class_without_synsets(tree, tmp_path):
    tar = tmp_path / "ILSVRC2012_img_train.tar"
    write_imagenet_train_tar(tree, tar, unsafe_members=False)
    build(BuildConfig(str(tar), str(tmp_path / "out"), "train"), progress=False)
    assert descriptions(tmp_path / "out") == WNIDS


def test_a_class_folder_build_names_them_too_and_synsets_still_override(tree, tmp_path):
    build(BuildConfig(str(tree.root), str(tmp_path / "plain"), "train"), progress=False)
    assert descriptions(tmp_path / "plain") == WNIDS

    synsets = tmp_path / "my_names.txt"
    synsets.write_text("n03710637 one-piece swimsuit\nn15075141 loo roll\n")
    build(BuildConfig(str(tree.root), str(tmp_path / "renamed"), "train", synsets=str(synsets)), progress=False)
    assert descriptions(tmp_path / "renamed") == {**WNIDS, "n03710637": "one-piece swimsuit",
                                                  "n15075141": "loo roll"}


def test_the_table_is_package_data_in_the_wheel(tmp_path):
    """What `pip install .` installs: a wheel built from a copy of the project (the checkout stays untouched)."""
    project = tmp_path / "project"
    for name in ("shards", "pipeline", "trainer"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(project)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("alexnet_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read(f"shards/{SHIPPED}") == (REPO / "shards" / SHIPPED).read_bytes()
