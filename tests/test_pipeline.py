"""The input pipeline on real shards: DALI's CPU graph and the Pillow reference loader.

Nothing is mocked: DALI, webdataset and torch's DataLoader run for real on shards built by the
sharder from scikit-learn's digits (``digits_shards``) and from real photographs (``photo_shards``).
The GPU form of the graph (``device="cuda:N"``) cannot run on this machine and is not tested here.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import LoaderConfig, make_eval_loader, make_train_loader
from pipeline.config import (IMAGENET_STD_255, LIGHTING_STD, PCA_EIGVAL, PCA_EIGVEC,
                             lighting_covariance_255)
from pipeline.reference import buffer_shuffle, rebatch, take_turns
from pipeline.shardset import ShardSet, eval_steps, rank_range, train_steps
from shards.manifest import ShardError

REPO = Path(__file__).resolve().parents[1]
STD = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)


def split_keys(shard_dir) -> list[str]:
    """Every sample key of a split, read from its index files (names ``key.ext``)."""
    keys = []
    for shard in ShardSet.open(shard_dir).shards:
        for line in Path(shard.index).read_text().splitlines()[1:]:
            keys.append(line.split()[3].rsplit(".", 1)[0])
    return keys


def split_labels(shard_dir) -> dict[str, int]:
    """key -> label of every sample of a split, read from the tars with plain tarfile."""
    import tarfile

    labels = {}
    for shard in ShardSet.open(shard_dir).shards:
        with tarfile.open(shard.tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".cls"):
                    labels[member.name[:-4]] = int(tf.extractfile(member).read())
    return labels


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> Path:
    """A val split of 32 real photograph crops (4 ImageNet classes, 200-500 px sides), built with
    ``python -m shards build`` so resizing works on natural images of ImageNet's size."""
    from shards.sample_data import photo_crops

    root = tmp_path_factory.mktemp("photos")
    for i, (wnid, pixels) in enumerate(photo_crops(per_class=8, n_classes=4, seed=3, min_side=200, max_side=500)):
        folder = root / "raw" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=92)
    subprocess.run([sys.executable, "-m", "shards", "build", str(root / "raw"), str(root / "val"),
                    "--split", "val", "--max-count", "12", "--quiet"], check=True, cwd=REPO)
    return root / "val"


def cfg_for(shard_dir, **kw) -> LoaderConfig:
    base = dict(shard_dir=str(shard_dir), batch_size=16, num_threads=2, shuffle_buffer=64, num_workers=0)
    return LoaderConfig(**{**base, **kw})


SMALL = dict(image_size=32, resize_shorter=36)  # where only counts or per-image values matter: faster


def run_debug(cfg: LoaderConfig, batches: int, epoch: int = 0):
    """Run the training graph with its debug outputs: images, labels, window, mirror, shift."""
    from pipeline.dali_loader import build_pipeline, parse_labels

    pipe = build_pipeline(cfg, ShardSet.open(cfg.shard_dir), train=True, epoch=epoch, debug=True)
    out = {"images": [], "labels": [], "window": [], "mirror": [], "shift": []}
    for _ in range(batches):
        images, cls, *extras = pipe.run()
        out["images"].append(torch.from_numpy(images.as_array().copy()))
        out["labels"].append(parse_labels(cls))
        names = (["window"] if cfg.crop == "paper" else []) + ["mirror", "shift"]
        for name, value in zip(names, extras):
            out[name].append(np.stack([np.array(value[i]) for i in range(len(value))]))
    return {k: (torch.cat(v) if k in ("images", "labels") else np.concatenate(v)) for k, v in out.items() if len(v)}


# --- configuration and pure helpers -------------------------------------------------------------

@pytest.mark.parametrize("bad, field", [
    (dict(crop="center"), "crop"), (dict(rank=2, world_size=2), "rank"), (dict(device="gpu0"), "device"),
    (dict(layout="HWC"), "layout"), (dict(dtype="int8"), "dtype"), (dict(batch_size=0), "batch_size"),
    (dict(image_size=300), "image_size"), (dict(normalize="std"), "normalize"),
])
def test_config_rejects_bad_values_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=rf"LoaderConfig\.{field}="):
        LoaderConfig(shard_dir="x", **bad)


def test_config_derived_values():
    assert LoaderConfig("x").use_lighting and not LoaderConfig("x", crop="rrc").use_lighting
    assert LoaderConfig("x", crop="rrc", lighting=True).use_lighting
    assert LoaderConfig("x").device_id is None and LoaderConfig("x", device="cuda:3").device_id == 3


@pytest.mark.parametrize("n", [1, 7, 359, 1438])
def test_rank_ranges_partition_the_split(n):
    for ws in (1, 2, 3, 5):
        ranges = [rank_range(n, r, ws) for r in range(ws)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1
        for b in (1, 16, 64):
            assert train_steps(n, ws, b) * b <= min(sizes)
            assert eval_steps(n, ws, b) * b >= max(sizes) > (eval_steps(n, ws, b) - 1) * b


def test_stages_on_plain_lists():
    items = [(i, f"s{i}") for i in range(23)]
    turns = [list(take_turns(items, w, 3, chunk=4)) for w in range(3)]
    assert sorted(p for t in turns for p, _ in t) == list(range(23))
    assert [p for p, _ in turns[1]] == [4, 5, 6, 7, 16, 17, 18, 19]
    shuffled = list(buffer_shuffle(range(100), 10, random.Random(0)))
    assert sorted(shuffled) == list(range(100)) and shuffled != list(range(100))
    assert shuffled == list(buffer_shuffle(range(100), 10, random.Random(0)))
    batches = [(torch.arange(k), [str(i) for i in range(k)]) for k in (3, 5, 1, 7)]
    out = list(rebatch(batches, 4))
    assert [len(b[0]) for b in out] == [4, 4, 4, 4]
    assert torch.cat([b[0] for b in out]).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6]
    assert out[1][1] == ["1", "2", "3", "4"]


# --- training batches ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dali", "reference"])
@pytest.mark.parametrize("layout, dtype, crop", [("NCHW", "float32", "paper"), ("NHWC", "float16", "rrc"),
                                                 ("NCHW", "bfloat16", "paper")])
def test_train_batches_shapes_dtypes_layouts_labels(digits_shards, kind, layout, dtype, crop):
    cfg = cfg_for(digits_shards.train, layout=layout, dtype=dtype, crop=crop, world_size=2, rank=1)
    loader = make_train_loader(cfg, kind=kind)
    assert len(loader) == (1438 // 2) // 16                     # full epochs: see the rank tests below
    batches = [batch for _, batch in zip(range(3), loader)]
    images, labels = batches[0]
    assert images.shape == (16, 3, 224, 224)
    assert images.dtype == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    assert images.is_contiguous(memory_format=torch.channels_last if layout == "NHWC" else torch.contiguous_format)
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    assert set(torch.cat([lb for _, lb in batches]).tolist()) <= set(range(10))
    # normalised by the ImageNet mean/std: digit scans are black (-2.1 after normalising) with white strokes
    x = images.float()
    assert -2.5 < x.min() < -1.5 and 1.5 < x.max() < 3.2


def test_paper_crops_lie_inside_the_central_square(photo_shards):
    cfg = cfg_for(photo_shards, batch_size=8, lighting=False)
    out = run_debug(cfg, batches=8)
    x0, y0, side, w, h = out["window"].T
    s = np.minimum(w, h)
    assert (side == np.floor(s * 224 / 256)).all()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + side <= w).all() and (y0 + side <= h).all()
    # inside the centre s x s square (whole-pixel rounding allows 1 px)
    assert (x0 >= (w - s) / 2 - 1).all() and (x0 + side <= (w + s) / 2 + 1).all()
    assert (y0 >= (h - s) / 2 - 1).all() and (y0 + side <= (h + s) / 2 + 1).all()
    # the random offset spans its range (in units of the slack s - side)
    u = np.where(w > h, x0 - (w - s) / 2, y0 - (h - s) / 2) / (s - side)
    assert u.min() < 0.25 and u.max() > 0.75


def test_flip_rate_within_binomial_bounds_and_flips_the_image(digits_shards):
    cfg = cfg_for(digits_shards.train, batch_size=32, lighting=False, **SMALL)
    flipped = run_debug(cfg, batches=20)
    n, k = len(flipped["mirror"]), int(flipped["mirror"].sum())
    assert abs(k - n / 2) <= 4 * math.sqrt(n / 4), (k, n)     # 4 sigma of Binomial(n, 0.5)
    plain = run_debug(cfg.replace(flip=False), batches=20)    # same seed, same crops
    assert plain["mirror"].sum() == 0
    m = torch.from_numpy(flipped["mirror"].astype(bool))
    assert torch.equal(flipped["images"][m], plain["images"][m].flip(-1))
    assert torch.equal(flipped["images"][~m], plain["images"][~m])


def test_lighting_shift_has_the_paper_covariance_and_is_added_to_every_pixel(digits_shards):
    cfg = cfg_for(digits_shards.train, batch_size=64, flip=False, **SMALL)
    lit = run_debug(cfg, batches=25)
    shift = lit["shift"].astype(np.float64)                   # (1600, 3), RGB, 0-255 scale
    n = len(shift)
    # whitened by the expected V diag(lambda sigma 255), the shifts must be N(0, I): the sample
    # covariance's entries then have standard error ~sqrt(2/n) (diagonal) and ~sqrt(1/n) (off)
    whiten = np.diag(1 / (PCA_EIGVAL * LIGHTING_STD * 255)) @ PCA_EIGVEC.T
    cov = np.cov((shift @ whiten.T).T)
    assert np.all(np.abs(np.diag(cov) - 1) < 5 * math.sqrt(2 / n)), cov
    assert np.all(np.abs(cov[~np.eye(3, dtype=bool)]) < 5 * math.sqrt(1 / n)), cov
    # and unwhitened, against V diag(lambda^2 sigma^2) V^T itself: Var(cov_ij) = (S_ii S_jj + S_ij^2) / n
    expected = lighting_covariance_255()
    standard_error = np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected ** 2) / n)
    assert np.all(np.abs(np.cov(shift.T) - expected) < 5 * standard_error), (np.cov(shift.T), expected)
    # disabled: no shift, and the same seed gives the same crops, so images differ by exactly shift/std
    dark = run_debug(cfg.replace(lighting=False), batches=25)
    assert not dark["shift"].any()
    diff = (lit["images"] - dark["images"]) * STD             # back to 0-255 units, per channel
    want = torch.from_numpy(lit["shift"]).float().view(-1, 3, 1, 1).expand_as(diff)
    assert torch.allclose(diff, want, atol=1e-3)


@pytest.mark.parametrize("kind", ["dali", "reference"])
def test_mean_normalisation_is_the_standard_one_times_the_std(digits_shards, kind):
    """normalize="mean" (the paper) keeps the 0-255 scale: with the same seed, the same crops and the same
    lighting draws (folded into the per-sample mean), its batch is the "standard" batch times the std."""
    cfg = cfg_for(digits_shards.train, batch_size=16, flip=True, **SMALL)
    assert cfg.use_lighting
    standard, _ = next(iter(make_train_loader(cfg, kind)))
    mean, _ = next(iter(make_train_loader(cfg.replace(normalize="mean"), kind)))
    torch.testing.assert_close(mean, standard * STD, atol=2e-3, rtol=1e-5)


def test_rrc_mode_defaults_lighting_off(digits_shards):
    out = run_debug(cfg_for(digits_shards.train, crop="rrc"), batches=2)
    assert out["images"].shape == (32, 3, 224, 224) and not out["shift"].any() and "window" not in out


# --- evaluation ---------------------------------------------------------------------------------

def _pixel_diff_255(a: torch.Tensor, b: torch.Tensor, std: tuple = IMAGENET_STD_255) -> torch.Tensor:
    """|a - b| of two normalised (N, 3, H, W) batches, in 0-255 pixel levels (``std``: what they were divided by)."""
    return ((a - b) * torch.tensor(std).view(1, 3, 1, 1)).abs()


@pytest.mark.parametrize("shards_name, normalize", [("photo", "standard"), ("digits", "standard"), ("digits", "mean")])
def test_val_agrees_with_the_reference_loader(photo_shards, digits_shards, shards_name, normalize):
    """Same images, same labels, pixels within a stated tolerance, for either normalisation.

    Tolerance (0-255 pixel levels, after undoing the std): both loaders decode with libjpeg-turbo
    (identical bytes) and resize with a linear, antialiased (triangle) filter, but Pillow computes in
    fixed point and rounds its intermediate horizontal pass to 8 bits while DALI keeps it in float.
    That leaves most pixels within 1-2 levels and moves a few at sharp edges by up to tens of
    levels. So: mean |diff| <= 1.0 over the split, <= 2.5 for any image, 99th percentile <= 16.
    A wrong crop offset, channel order, mean or std breaks these by far (tens of levels on average).
    """
    shard_dir = photo_shards if shards_name == "photo" else digits_shards.val
    cfg = cfg_for(shard_dir, batch_size=16, normalize=normalize)
    diffs = []
    pairs = zip(make_eval_loader(cfg, "dali"), make_eval_loader(cfg, "reference"))
    for (x, y, m), (xr, yr, mr) in itertools.islice(pairs, 6):
        assert torch.equal(m, mr) and torch.equal(y[m], yr[mr])
        diffs.append(_pixel_diff_255(x[m], xr[mr], cfg.std_255))
    if normalize == "mean":   # centred 0-255 values: a black digit scan is about -124 (R), not -2.1
        assert -130 < float(x.min()) < -100 and float(x.max()) > 100
    d = torch.cat(diffs)
    per_image = d.flatten(1).mean(1)
    assert d.mean() <= 1.0 and per_image.max() <= 2.5, (d.mean(), per_image.max())
    assert torch.quantile(d.flatten()[::7], 0.99) <= 16


def test_ten_crop_is_the_papers_ten_patches(photo_shards):
    cfg = cfg_for(photo_shards, batch_size=8, ten_crop=True)
    (x, _, _), = [next(iter(make_eval_loader(cfg, "dali")))]
    assert x.shape == (8, 10, 3, 224, 224)
    (centre, _, _), = [next(iter(make_eval_loader(cfg.replace(ten_crop=False), "dali")))]
    assert torch.equal(x[:, 4], centre)                        # patch 4 is the centre crop
    assert torch.equal(x[:, 5:], x[:, :5].flip(-1))             # 5..9 mirror 0..4
    # patches 0..3 are the corners of the centre 256 square, in the order TL, TR, BL, BR
    (xr, _, _), = [next(iter(make_eval_loader(cfg, "reference")))]
    per_patch = _pixel_diff_255(x.flatten(0, 1), xr.flatten(0, 1)).flatten(1).mean(1).view(8, 10)
    assert per_patch.max() <= 2.5
    assert not torch.equal(x[:, 0], x[:, 1]) and not torch.equal(x[:, 0], x[:, 2])


@pytest.mark.parametrize("kind", ["dali", "reference"])
def test_eval_counts_every_image_exactly_once_for_1_2_3_ranks(digits_shards, kind):
    everything = Counter(split_keys(digits_shards.val))
    assert len(everything) == 359                               # keys are unique; 359 is prime
    truth = split_labels(digits_shards.val)
    for ws in (1, 2, 3):
        seen, lengths = Counter(), set()
        for rank in range(ws):
            cfg = cfg_for(digits_shards.val, batch_size=32, rank=rank, world_size=ws, **SMALL)
            loader = make_eval_loader(cfg, kind)
            loader.with_source = True
            lengths.add(len(loader))
            steps = 0
            for images, labels, mask, keys in loader:
                assert images.shape[0] == 32 and mask.dtype == torch.bool and labels.dtype == torch.int64
                kept = [(k, y) for k, y, keep in zip(keys, labels.tolist(), mask.tolist()) if keep]
                assert all(truth[k] == y for k, y in kept)      # each label is its own sample's cls
                seen.update(k for k, _ in kept)
                steps += 1
            assert steps == len(loader)
        assert len(lengths) == 1, f"ranks disagree on len(): {lengths}"
        assert seen == everything, f"world_size={ws}"


@pytest.mark.parametrize("kind", ["dali", "reference"])
def test_train_ranks_disjoint_same_length_and_reshuffled_per_epoch(digits_shards, kind):
    ws = 3
    cfg = cfg_for(digits_shards.train, batch_size=32, world_size=ws, num_workers=2 if kind == "reference" else 0,
                  **SMALL)
    truth = split_labels(digits_shards.train)
    ordered = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in range(ws):
            loader = make_train_loader(cfg.replace(rank=rank), kind)
            loader.with_source = True
            loader.set_epoch(epoch)
            batches = list(loader)
            keys = [k for _, _, ks in batches for k in ks]
            labels = torch.cat([lb for _, lb, _ in batches]).tolist()
            assert labels == [truth[k] for k in keys]
            assert len(keys) == len(loader) * 32 == (1438 // 3) // 32 * 32
            assert len(set(keys)) == len(keys)                  # no sample twice within an epoch
            per_rank.append(keys)
        assert all(not set(a) & set(b) for i, a in enumerate(per_rank) for b in per_rank[i + 1:])
        ordered[epoch] = per_rank
    assert ordered[0][0] != ordered[1][0]
    assert set(ordered[0][0]) != set(ordered[1][0])            # the tar order changes per epoch


# --- bad shards ---------------------------------------------------------------------------------

def _copy_split(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_without_cls(split: Path, shard_name: str, victim: int) -> None:
    """Rewrite one tar with sample ``victim`` lacking its ``cls`` file, with a fresh index and
    manifest entry (so only the missing label is wrong)."""
    import hashlib
    import tarfile

    import webdataset as wds

    tar = split / shard_name
    samples = {}
    with tarfile.open(tar) as tf:
        for member in tf.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(member).read()
    keys = list(samples)
    del samples[keys[victim]]["cls"]
    with wds.TarWriter(str(tar)) as writer:
        for key in keys:
            writer.write(samples[key])
    index = tar.with_suffix(".idx")
    subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tar), str(index)], check=True,
                   capture_output=True)
    manifest = json.loads((split / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard_name:
            entry["bytes"] = tar.stat().st_size
            entry["sha256"] = hashlib.sha256(tar.read_bytes()).hexdigest()
    (split / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["dali", "reference"])
def test_truncated_shard_fails_naming_the_shard(digits_shards, tmp_path, kind):
    split = _copy_split(digits_shards.val, tmp_path / "val")
    tar = split / "val-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ShardError) as info:
        make_eval_loader(cfg_for(split), kind)
    message = str(info.value)
    assert "val-000001.tar" in message and "truncated" in message and "\n" not in message


@pytest.mark.parametrize("kind", ["dali", "reference"])
def test_sample_without_cls_fails_naming_the_shard(digits_shards, tmp_path, kind):
    split = _copy_split(digits_shards.val, tmp_path / "val")
    _rewrite_without_cls(split, "val-000000.tar", victim=5)
    with pytest.raises(ShardError) as info:
        make_train_loader(cfg_for(split), kind)
    message = str(info.value)
    assert "val-000000.tar" in message and "'cls'" in message and "\n" not in message


def test_dali_reader_error_names_the_shard(digits_shards, tmp_path):
    """Past the index check, a shard that changed under us (here: the same bytes but a label file
    missing in the index we hand DALI) still fails with one line naming the shard."""
    from pipeline.dali_loader import build_pipeline

    split = _copy_split(digits_shards.val, tmp_path / "val")
    shardset = ShardSet.open(split)                              # validated while still intact
    _rewrite_without_cls(split, "val-000001.tar", victim=0)
    with pytest.raises(ShardError) as info:
        pipe = build_pipeline(cfg_for(split, world_size=2, rank=1), shardset, train=False)
        pipe.run()
    message = str(info.value)
    assert "val-000001.tar" in message and "\n" not in message


@pytest.mark.parametrize("loader", ["eval", "train"])
def test_reference_reader_refuses_a_shard_that_ends_early(digits_shards, tmp_path, loader):
    """A shard whose bytes changed after the split was checked (the same size: one member's tar header overwritten
    mid-file). Python's tarfile stops there without an error; the reader names the shard and the fix instead of
    leaving the rest of the shard out (which shifted labels and cut the epoch short, silently)."""
    import tarfile

    split = _copy_split(digits_shards.val, tmp_path / "val")
    make = make_eval_loader if loader == "eval" else make_train_loader
    batches = make(cfg_for(split), "reference")                    # validated while still intact
    tar = split / "val-000000.tar"
    with tarfile.open(tar) as t:
        header = t.getmembers()[150].offset                        # sample 50's third member
    data = bytearray(tar.read_bytes())
    data[header:header + 512] = b"\xff" * 512
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardError) as info:
        list(batches)
    assert str(info.value) == (f"{tar}: ends after 50 of its 200 samples (a damaged tar header?); rebuild the split "
                               "with `python -m shards build`")


def test_dali_reader_reads_every_sample_of_a_shard_with_a_damaged_header(digits_shards, tmp_path):
    """The same damage as above, through DALI: its reader finds members by the index's offsets, not by walking
    the tar headers, so it reads every sample (the payloads are intact) with the same labels and images."""
    import tarfile

    split = _copy_split(digits_shards.val, tmp_path / "val")
    cfg = cfg_for(split, **SMALL)

    def everything():
        batches = list(make_eval_loader(cfg, "dali"))
        return torch.cat([b[0].float() for b in batches]), torch.cat([b[1].flatten() for b in batches])

    images, labels = everything()
    tar = split / "val-000000.tar"
    with tarfile.open(tar) as t:
        header = t.getmembers()[150].offset
    data = bytearray(tar.read_bytes())
    data[header:header + 512] = b"\xff" * 512
    tar.write_bytes(bytes(data))
    damaged_images, damaged_labels = everything()
    assert len(labels) >= 359 and torch.equal(damaged_labels, labels) and torch.equal(damaged_images, images)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: cuda:0 is valid here")
@pytest.mark.parametrize("kind", ["dali", "reference"])
def test_cuda_device_without_a_gpu_is_a_clear_error(digits_shards, kind):
    with pytest.raises(ValueError, match=r"LoaderConfig\.device='cuda:0'.*cpu"):
        make_train_loader(cfg_for(digits_shards.val, device="cuda:0"), kind)


def test_reference_loader_works_without_dali(digits_shards):
    """The fallback where DALI is not installed: importing nvidia.dali fails, kind="reference" works."""
    code = f"""
import sys
sys.modules["nvidia.dali"] = None          # makes `import nvidia.dali` raise ImportError
from pipeline import LoaderConfig, make_eval_loader, make_train_loader
cfg = LoaderConfig({str(digits_shards.val)!r}, batch_size=8, num_workers=0, image_size=32, resize_shorter=36)
images, labels = next(iter(make_train_loader(cfg, kind="reference")))
assert images.shape == (8, 3, 32, 32)
try:
    make_eval_loader(cfg, kind="dali")
except ImportError:
    print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --- the command line ---------------------------------------------------------------------------

def _cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          cwd=REPO, check=check, timeout=300)


def test_cli_preview_writes_a_grid(digits_shards, tmp_path, run_main):
    out = tmp_path / "grid.png"
    result = run_main("pipeline", "preview", digits_shards.train, "--out", out, "--rows", "2", "--cols", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    grid = Image.open(out)
    assert grid.mode == "RGB" and grid.width > 4 * 224 and grid.height > 2 * 224
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_cli_preview_bad_shards_one_line_error_and_no_file(digits_shards, tmp_path):
    # a fresh interpreter: a warning printed while the command's modules import would break the one line
    out = tmp_path / "grid.png"
    result = _cli("preview", str(tmp_path / "missing"), "--out", str(out), check=False)
    assert result.returncode != 0 and not out.exists()
    assert result.stderr.strip().count("\n") == 0 and "missing" in result.stderr


def test_cli_bench_json_last_line(digits_shards, run_main):
    result = run_main("pipeline", "bench", digits_shards.train, "--json", "--batches", "2", "--warmup", "1",
                      "--repeat", "1", "--batch-size", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) >= {"dali_img_s", "reference_img_s", "ratio"}
    assert figures["dali_img_s"] > 0 and figures["reference_img_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["dali_img_s"] / figures["reference_img_s"], rel=1e-2)
