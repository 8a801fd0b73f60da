"""`python -m trainer eval` and `python -m trainer predict`.

eval: each of N ranks (Ray tasks when N > 1) runs the eval loader over its slice of the shards and
returns *counts* over the rows its mask marks as real; the driver sums them, so top-1 / top-5 are over
exactly the split's images for any N (and ``n`` is checked against the manifest).
predict: Pillow resize + centre crop + normalise, the same preprocessing as the eval loader, one image
at a time; class names come from the checkpoint.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint as ckpt
from trainer.config import Config
from trainer.model import AlexNet


def load_model(checkpoint_path: str) -> tuple[AlexNet, dict[str, Any]]:
    obj = ckpt.load(checkpoint_path)
    meta = ckpt.model_meta(obj, checkpoint_path)  # checked against the weights: builds nothing larger than them
    model = AlexNet(len(meta["classes"]), width=meta["width"], dropout=meta.get("dropout", 0.5),
                    image_size=meta["image_size"], **ckpt.variant_args(meta))
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise ValueError(f"{checkpoint_path}: weights do not fit AlexNet(width={meta['width']}, "
                         f"image_size={meta['image_size']}) ({str(e).splitlines()[0][:160]})") from None
    return model.eval(), meta


def eval_config(meta: dict[str, Any], loader: str) -> Config:
    cfg = Config()
    cfg.data.image_size, cfg.data.resize_shorter, cfg.data.loader = meta["image_size"], meta["resize_shorter"], loader
    cfg.data.normalize = ckpt.input_normalize(meta)   # the inputs the model was trained on
    cfg.train.precision = "fp32"
    return cfg


def eval_rank(checkpoint_path: str, data: str, rank: int, world_size: int, ten_crop: bool, loader: str,
              batch_size: int, num_threads: int) -> dict[str, float]:
    """Counts for one rank's slice: {"loss_sum", "top1", "top5", "n"}."""
    from pipeline import make_eval_loader
    from trainer.loop import evaluate as evaluate_counts

    torch.set_num_threads(max(1, num_threads))
    model, meta = load_model(checkpoint_path)
    cfg = eval_config(meta, loader)
    cfg.data.num_threads = num_threads
    cpu = torch.device("cpu")
    lcfg = cfg.loader_config(data, rank=rank, world_size=world_size, device=cpu, batch_size=batch_size,
                             ten_crop=ten_crop)
    return evaluate_counts(model, make_eval_loader(lcfg, kind=loader), cpu, ten_crop=ten_crop)


def evaluate(checkpoint_path: str, data: str, ten_crop: bool = False, workers: int = 1, loader: str = "dali",
             batch_size: int = 64, num_threads: int = 1) -> dict[str, Any]:
    """top-1 / top-5 over every image in ``data``, split over ``workers`` ranks."""
    from shards.manifest import load_classes, load_manifest

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    data = str(Path(data).resolve())
    manifest = load_manifest(data)
    _, meta = load_model(checkpoint_path)  # fail here, before any worker starts, on a bad checkpoint
    if load_classes(data) != list(meta["classes"]):
        raise ValueError(f"{data}/classes.json differs from the classes stored in {checkpoint_path}; "
                         f"evaluate on shards built with the training run's classes.json")
    args = (checkpoint_path, data)
    if workers == 1:
        parts = [eval_rank(*args, 0, 1, ten_crop, loader, batch_size, num_threads)]
    else:
        import ray
        from trainer.ray_cluster import init_ray

        init_ray(workers, 1, 0)
        task = ray.remote(num_cpus=1)(eval_rank)
        parts = ray.get([task.remote(*args, r, workers, ten_crop, loader, batch_size, num_threads)
                         for r in range(workers)])
    total = {k: sum(p[k] for p in parts) for k in ("loss_sum", "top1", "top5", "n")}
    n = int(total["n"])
    if n != manifest["num_samples"]:
        raise RuntimeError(f"evaluated {n} images but {data}/manifest.json lists {manifest['num_samples']}")
    return {"top1": total["top1"] / n, "top5": total["top5"] / n, "n": n, "loss": total["loss_sum"] / n}


# ---------------------------------------------------------------------------------------- predict

def preprocess(path: str, image_size: int, resize_shorter: int, normalize_as: str = "standard") -> torch.Tensor:
    """Resize the shorter side, centre-crop, normalise (``normalize_as``: data.normalize): the reference eval
    loader's own functions."""
    from PIL import Image, UnidentifiedImageError
    from pipeline.config import divisor_255
    from pipeline.reference import crop_at, normalize, resize_shorter as resize

    try:
        with warnings.catch_warnings():  # Pillow's "possible decompression bomb" warning: refuse instead
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                image = im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: refused as a possible decompression bomb ({str(e).split(', could be')[0]}); "
                         f"pass a smaller JPEG or PNG") from None
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot read this image ({type(e).__name__}); pass JPEG or PNG files") from None
    return normalize(crop_at(resize(image, resize_shorter), image_size, 0.5, 0.5), std=divisor_255(normalize_as))


@torch.no_grad()
def predict(checkpoint_path: str, images: list[str], k: int = 5) -> list[dict[str, Any]]:
    model, meta = load_model(checkpoint_path)
    classes = list(meta["classes"])
    out = []
    for path in images:
        x = preprocess(path, meta["image_size"], meta["resize_shorter"], ckpt.input_normalize(meta)).unsqueeze(0)
        probs = model(x).softmax(dim=1)[0]
        top = probs.topk(min(k, len(classes)))
        out.append({"image": path, "top5": [{"class": classes[i], "prob": round(float(p), 6)}
                                            for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    return out
