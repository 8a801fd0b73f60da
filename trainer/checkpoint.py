"""What a run saves and how: atomic writes, RNG states, and the plain files eval/predict read.

Two kinds of file, both loadable with ``torch.load(path, weights_only=True)`` (only tensors and plain
Python values inside, so loading never runs pickled code):

- the *training state* (``checkpoint.pt`` inside each Ray Train checkpoint directory): model,
  optimizer, scheduler, epoch, every rank's RNG states, the config and the class names; enough to
  continue a run exactly where it stopped.
- the *model file* (``RUN_DIR/last.pt``, ``RUN_DIR/best.pt``): ``{"model": state_dict, "meta": {...}}``
  with the class names, width, image size and the epoch's metrics; what ``eval`` and ``predict`` need.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAINING_STATE = "checkpoint.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary name in the same directory, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes removed,
    on the CPU, so files are interchangeable between single-device, DDP, compiled and split models."""
    out = {}
    for key, value in model.state_dict().items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value.detach().to("cpu", copy=True)
    return out


def rng_state() -> dict[str, Any]:
    """This process's RNG states as weights_only-safe values (tensors, ints, lists)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a model file or training state safely; a directory means its ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / TRAINING_STATE, path / "best.pt", path / "last.pt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ValueError(f"{path}: no {TRAINING_STATE}, best.pt or last.pt inside; pass a file written by "
                             f"`python -m trainer fit` (RUN_DIR/best.pt)")
        path = found
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint; pass RUN_DIR/best.pt or RUN_DIR/last.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects that weights_only refuses
        found = re.search(r"Unsupported (?:global|operand)[^.\n]*", str(e))
        if isinstance(e, pickle.UnpicklingError) and found:  # would run code if loaded without weights_only
            raise ValueError(f"{path}: refused, it holds pickled Python objects ({found.group(0)}); checkpoints are "
                             f"loaded with weights_only=True and never run pickled code: use a file written by "
                             f"`python -m trainer fit`") from None
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"use a file written by `python -m trainer fit`") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"{path}: not a trainer checkpoint (no 'model' entry); use RUN_DIR/best.pt")
    return obj


def model_meta(obj: dict[str, Any]) -> dict[str, Any]:
    """The model's construction arguments and class names from a model file or training state."""
    if "meta" in obj:
        return obj["meta"]
    cfg = obj["config"]
    return {"classes": obj["classes"], "width": cfg["model"]["width"], "image_size": cfg["data"]["image_size"],
            "dropout": cfg["model"]["dropout"], "resize_shorter": obj.get("resize_shorter", 0),
            "epoch": obj["epoch"]}
