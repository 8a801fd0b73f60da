"""What decides how the loaders behave on a GPU, checked where it shows on the CPU.

Real DALI CPU graphs and the Pillow reference loader on real shards: EXIF orientation, the crop offsets, the
hand-off of DALI's buffers to torch, the next epoch's pipeline built ahead, the decoder's preallocation
from manifest.json, the decoder threads a worker gets, and which DALI errors are blamed on the shards.
"""
from __future__ import annotations

import gc
import io
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline import LoaderConfig, make_eval_loader, make_train_loader
from pipeline.config import IMAGENET_STD_255
from pipeline.reference import crop_offset, eval_transform, paper_window
from pipeline.shardset import ShardSet
from shards.manifest import ShardError

STD = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
SMALL = dict(image_size=32, resize_shorter=36)
ORIENTATION_TAG = 0x0112


def cfg_for(shard_dir, **kw) -> LoaderConfig:
    base = dict(shard_dir=str(shard_dir), batch_size=16, num_threads=2, shuffle_buffer=64, num_workers=0)
    return LoaderConfig(**{**base, **kw})


def debug_windows(cfg: LoaderConfig, batches: int) -> np.ndarray:
    """The paper crop's (x0, y0, side, W, H) per image, from the training graph's debug outputs."""
    from pipeline.dali_loader import build_pipeline

    pipe = build_pipeline(cfg, ShardSet.open(cfg.shard_dir), train=True, debug=True)
    rows = []
    for _ in range(batches):
        _, _, window, *_ = pipe.run()
        rows += [np.array(window[i]) for i in range(len(window))]
    return np.stack(rows)


@pytest.fixture(scope="module")
def rotated_split(tmp_path_factory) -> Path:
    """8 JPEGs, 96 wide x 64 high, that carry EXIF orientation 6 (display rotated 90 degrees), sharded in copy
    mode (the bytes, tag included, go into the tar as they are)."""
    from shards.build import BuildConfig, build

    root = tmp_path_factory.mktemp("exif")
    y, x = np.mgrid[0:64, 0:96]
    base = np.stack([x * 2.6, y * 3.9, (x + 2 * y) * 1.1], -1).clip(0, 255).astype(np.uint8)
    base[8:24, 8:40] = (240, 40, 40)          # a block off-centre: a rotation moves it far
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    for i in range(8):
        folder = root / "raw" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, 9 * i, axis=1)).save(folder / f"{i}.jpg", quality=95, exif=exif)
    build(BuildConfig(str(root / "raw"), str(root / "val"), "val", max_count=100, seed=0), progress=False)
    return root / "val"


# --- EXIF orientation ---------------------------------------------------------------------------

def test_exif_orientation_is_ignored_by_both_loaders(rotated_split):
    import tarfile

    shard = ShardSet.open(rotated_split).shards[0]
    with tarfile.open(shard.tar) as tf:
        jpg = next(tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg"))
    assert Image.open(io.BytesIO(jpg)).getexif()[ORIENTATION_TAG] == 6   # the tag survived

    cfg = cfg_for(rotated_split, batch_size=8, **SMALL)
    (x, y, m), = list(make_eval_loader(cfg, "dali"))
    (xr, yr, mr), = list(make_eval_loader(cfg, "reference"))
    diff = ((x - xr) * STD).abs()
    assert diff.mean() <= 1.0 and diff.flatten(1).mean(1).max() <= 2.5, diff.mean()   # the stated tolerance

    # x[0] is the tar's first sample; a loader that applied the tag would give this instead, far from it
    upright = eval_transform(ImageOps.exif_transpose(Image.open(io.BytesIO(jpg))).convert("RGB"), cfg)
    assert torch.allclose(xr[0], eval_transform(Image.open(io.BytesIO(jpg)).convert("RGB"), cfg))
    assert ((x[0] - upright) * STD[0]).abs().mean() > 10

    # the training crop's window is computed on the stored (unrotated) size too
    window = debug_windows(cfg.replace(batch_size=8), batches=1)
    assert (window[:, 3] == 96).all() and (window[:, 4] == 64).all()
    assert ShardSet.open(rotated_split).max_size == (96, 64)           # manifest.json: stored sizes


# --- crop offsets -------------------------------------------------------------------------------

def test_reference_paper_crop_reaches_all_33_offsets():
    rng = random.Random(0)
    seen = {crop_offset(256, 256, 224, rng.random()) for _ in range(4000)}
    assert seen == set(range(33))
    last = math.nextafter(1.0, 0.0)
    assert crop_offset(256, 256, 224, 0.0) == 0 and crop_offset(256, 256, 224, last) == 32
    # a 300 x 256 image: the central square starts at x = 22; its last offset still fits the image
    assert paper_window(300, 256, 224 / 256, last, last) == (54, 32, 224)


def test_dali_paper_crop_reaches_every_offset(digits_shards):
    """64 x 64 digits with a 32/36 crop: side 56, slack 8, so 9 positions per axis; 512 draws per axis."""
    window = debug_windows(cfg_for(digits_shards.train, batch_size=128, lighting=False, **SMALL), batches=4)
    x0, y0, side, w, h = window.T
    assert (side == 56).all() and (w == 64).all() and (h == 64).all()
    assert set(x0.astype(int)) == set(range(9)) and set(y0.astype(int)) == set(range(9))


# --- hand-off and epochs ------------------------------------------------------------------------

def test_batches_are_handed_over_without_a_copy_and_outlive_the_pipeline(digits_shards):
    from pipeline.dali_loader import build_pipeline, to_torch

    cfg = cfg_for(digits_shards.train, batch_size=32, **SMALL)
    pipe = build_pipeline(cfg, ShardSet.open(cfg.shard_dir), train=True)
    images = pipe.run()[0]
    dense = images.as_tensor()
    assert to_torch(images, torch.device("cpu")).data_ptr() == dense.data_ptr()   # DALI's buffer itself
    del pipe, images, dense

    loader = make_train_loader(cfg)
    kept = [(x, x.clone()) for x, _ in loader]
    assert len({x.data_ptr() for x, _ in kept}) == len(kept) == len(loader)     # no buffer reused
    del loader
    gc.collect()
    assert all(torch.equal(x, copy) for x, copy in kept)


def _epoch(loader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone(), keys) for x, y, keys in loader]


def test_next_epoch_built_ahead_gives_the_same_batches(digits_shards):
    cfg = cfg_for(digits_shards.train, batch_size=64, **SMALL)
    ahead, plain = make_train_loader(cfg), make_train_loader(cfg)
    plain.build_ahead = False
    for loader in (ahead, plain):
        loader.with_source = True
    runs = {name: [] for name in ("ahead", "plain")}
    for epoch in (0, 1, 3):              # 3: not the epoch built ahead (2), which is dropped
        runs["ahead"].append(_epoch(ahead, epoch))
        runs["plain"].append(_epoch(plain, epoch))
        assert ahead._ahead is not None and ahead._ahead.key == (epoch + 1, True) and plain._ahead is None
    for got, want in zip(runs["ahead"], runs["plain"]):
        assert [b[2] for b in got] == [b[2] for b in want]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
    assert runs["plain"][0][0][2] != runs["plain"][1][0][2]             # epochs do differ


# --- decoder settings from manifest.json --------------------------------------------------------

def test_manifest_records_the_largest_image_and_sizes_the_gpu_decoder(digits_shards, tmp_path):
    from pipeline.dali_loader import gpu_decoder_settings

    manifest = json.loads((digits_shards.train / "manifest.json").read_text())
    assert (manifest["max_width"], manifest["max_height"]) == (64, 64)
    shardset = ShardSet.open(digits_shards.train)
    settings = gpu_decoder_settings(LoaderConfig(shard_dir="x", device="cuda:0"), shardset.max_size)
    assert settings == {"hw_decoder_load": 0.75, "jpeg_fancy_upsampling": True,
                        "preallocate_width_hint": 64, "preallocate_height_hint": 64}   # DALI's default paddings
    assert gpu_decoder_settings(LoaderConfig(shard_dir="x", hw_decoder_load=0.0))["hw_decoder_load"] == 0.0

    old = tmp_path / "old"                   # a manifest written before the fields existed still loads
    shutil.copytree(digits_shards.val, old)
    m = json.loads((old / "manifest.json").read_text())
    for key in ("max_width", "max_height"):
        del m[key]
    (old / "manifest.json").write_text(json.dumps(m))
    assert ShardSet.open(old).max_size is None
    (x, y, mask), *_ = make_eval_loader(cfg_for(old, **SMALL))
    assert x.shape == (16, 3, 32, 32)

    (old / "manifest.json").write_text(json.dumps({**m, "max_width": 10 ** 9, "max_height": 64}))
    with pytest.raises(ShardError, match=r"manifest\.json: max_width / max_height .*; rebuild") as info:
        ShardSet.open(old)
    assert "\n" not in str(info.value)


# --- decoder threads ----------------------------------------------------------------------------

def test_decoder_threads_default_to_the_workers_cpus_on_a_gpu():
    from trainer.config import Config, GPU_WORKER_CPUS
    from trainer.ray_cluster import decide_cpus

    def threads(gpus, cpus="auto", num_threads=0):
        cfg = Config()
        cfg.run.gpus_per_worker, cfg.run.cpus_per_worker, cfg.data.num_threads = gpus, cpus, num_threads
        lcfg = cfg.loader_config("shards", rank=0, world_size=1, device="cuda:0" if gpus else "cpu", batch_size=8)
        return lcfg.num_threads, lcfg.num_workers

    assert threads(0) == (2, 2)                                   # CPU workers keep 2
    assert threads(1) == (GPU_WORKER_CPUS, GPU_WORKER_CPUS) == (8, 8)
    assert threads(1, cpus=4.0) == (4, 4) and threads(1, cpus=4.0, num_threads=3) == (3, 3)
    assert decide_cpus("auto", 1, 4, 64) == 8 and decide_cpus("auto", 1, 4, 16) == 4   # a share of the cluster
    assert decide_cpus("auto", 0, 2, 64) == 1 and decide_cpus(3.0, 1, 1, 2) == 3


# --- which DALI errors are the shards' fault ----------------------------------------------------

def _dali_text(op: str, reason: str) -> str:
    """A DALI 2.x operator error as pipe.run() raises it (graph traceback, "encountered:", reason, context)."""
    return (f"Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.{op}`,\n"
            "which was used in the pipeline definition with the following traceback:\n\n"
            '  File "/work/pipeline/dali_loader.py", line 136, in _graph\n'
            "    images = fn.decoders.image_slice(jpegs, fn.stack(x0, y0), fn.stack(side, side), axis_names=\"WH\",\n"
            f"\nencountered:\n\n{reason}\nC++ context: [/opt/dali/dali/operators/imgcodec/image_decoder.h:640] \n"
            "Current pipeline object is no longer valid.")


NOT_DATA = [
    ("decoders.image_slice", "Can't allocate 211025920 bytes on device 0."),          # CUDABadAlloc
    ("decoders.image", "CUDA allocation failed"),
    ("decoders.image", "nvImageCodec failure: '#10'"),     # MISSED_DEPENDENCIES: nvJPEG missing at start-up
    ("decoders.image_random_crop", "nvImageCodec failure: '#5'"),                      # ALLOCATOR_FAILURE
    ("decoders.image", "nvImageCodec failure: '#7'"),                                  # ARCH_MISMATCH
    ("resize", "CUDA runtime API error cudaErrorInitializationError (3):\ninitialization error"),
]


@pytest.mark.parametrize("op, reason", NOT_DATA)
def test_gpu_and_start_up_errors_are_not_blamed_on_the_shards(op, reason):
    from pipeline.dali_loader import _about_data

    assert not _about_data(RuntimeError(_dali_text(op, reason)))


def run_all(pipe, batches: int = 12) -> None:
    for _ in range(batches):    # rank 1's 180 samples: the error comes once the reader reaches the shard
        pipe.run()


def test_data_errors_name_the_shard(digits_shards, tmp_path):
    from pipeline.dali_loader import _about_data, _shard_error, build_pipeline

    shardset = ShardSet.open(digits_shards.val)
    tar = shardset.shards[1].tar
    crafted = RuntimeError(_dali_text("decoders.image", f"Failed to decode sample #3 : {tar}:1536:val_00000042.jpg"))
    assert _about_data(crafted) and str(_shard_error(crafted, shardset)).startswith(f"{tar}: DALI failed")
    assert _about_data(RuntimeError(_dali_text("decoders.image", "nvImageCodec failure: '#4'")))

    # real DALI texts: a tar shorter than its index, and JPEG bytes zeroed in place (same size)
    split = tmp_path / "val"
    shutil.copytree(digits_shards.val, split)
    intact = ShardSet.open(split)
    victim = split / "val-000001.tar"
    data = bytearray(victim.read_bytes())
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError) as info:
        run_all(build_pipeline(cfg_for(split, world_size=2, rank=1), intact, train=False))
    assert _about_data(info.value) and "val-000001.idx" in str(info.value)

    for line in (split / "val-000001.idx").read_text().splitlines()[1:]:
        fields = line.split()
        for k in range(0, len(fields), 4):
            if fields[k] == "jpg":
                offset, size = int(fields[k + 1]), int(fields[k + 2])
                data[offset + 2: offset + size] = bytes(size - 2)   # keep the SOI marker only
    victim.write_bytes(data)
    with pytest.raises(RuntimeError) as info:
        run_all(build_pipeline(cfg_for(split, world_size=2, rank=1), intact, train=False))
    assert "nvImageCodec failure: '#3'" in str(info.value) and _about_data(info.value)
    with pytest.raises(ShardError) as info:
        list(make_eval_loader(cfg_for(split, world_size=2, rank=1)))
    message = str(info.value)
    assert "val-000001.tar" in message and "shards verify" in message and "\n" not in message
