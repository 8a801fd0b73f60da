"""Input pipeline: WebDataset shards -> augmented batches (docs/design.md section 2).

``kind="dali"`` builds the DALI graph (:mod:`pipeline.dali_loader`); ``kind="reference"`` uses Pillow +
webdataset + a torch DataLoader (:mod:`pipeline.reference`) and works without DALI installed: DALI
is imported only when asked for. Both subclass :class:`pipeline.loader.Loader`: the rank's slice, epochs,
``len()``, ``state_dict()`` and the up-front checks live there once.
"""
from __future__ import annotations

from .config import LoaderConfig

KINDS = ("dali", "reference")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"loader kind {kind!r}: choose one of {KINDS}")


def make_train_loader(cfg: LoaderConfig, kind: str = "dali"):
    """A training loader: ``set_epoch(e)``, ``len()`` steps (same on every rank), yields
    ``(images, labels)`` on ``cfg.device``; labels int64."""
    _check_kind(kind)
    if kind == "dali":
        from .dali_loader import DaliTrainLoader
        return DaliTrainLoader(cfg)
    from .reference import ReferenceTrainLoader
    return ReferenceTrainLoader(cfg)


def make_eval_loader(cfg: LoaderConfig, kind: str = "dali"):
    """An eval loader yielding ``(images, labels, mask)``; images (B,C,H,W) or (B,10,C,H,W) with
    ``cfg.ten_crop``; the True rows of ``mask`` over all ranks are exactly the split's images."""
    _check_kind(kind)
    if kind == "dali":
        from .dali_loader import DaliEvalLoader
        return DaliEvalLoader(cfg)
    from .reference import ReferenceEvalLoader
    return ReferenceEvalLoader(cfg)


__all__ = ["LoaderConfig", "make_train_loader", "make_eval_loader", "KINDS"]
