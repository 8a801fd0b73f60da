"""Shared pytest fixtures, each built once per test session."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


# ---------------------------------------------------------------- shards

@dataclass(frozen=True)
class DigitsShards:
    """Real shard directories built from scikit-learn's digits (64x64 RGB JPEGs, 10 classes)."""
    train: Path      # 1438 samples, 5 shards (--max-count 300)
    val: Path        # 359 samples, 2 shards (--max-count 200), train's classes.json reused
    raw: Path        # the exported class folders: raw/train/digit_<d>/*.jpg, raw/val/...


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> DigitsShards:
    from shards.build import BuildConfig, build
    from shards.sample_data import export_digits

    root = tmp_path_factory.mktemp("digits")
    export_digits(root / "raw", size=64)
    train, val = root / "shards" / "train", root / "shards" / "val"
    build(BuildConfig(str(root / "raw" / "train"), str(train), "train", max_count=300, seed=0), progress=False)
    build(BuildConfig(str(root / "raw" / "val"), str(val), "val", classes=str(train / "classes.json"),
                      max_count=200, seed=0), progress=False)
    return DigitsShards(train=train, val=val, raw=root / "raw")


# ---------------------------------------------------------------- Hypothesis profiles (fuzz tests)

# "ci", the default: a fixed seed (derandomize) and 200 examples per property, sized for the suite's time
# budget; a property that needs another count scales settings.default.max_examples. "fuzz" (`make fuzz`,
# HYPOTHESIS_PROFILE=fuzz): 25 times more examples from a random seed; a failure prints its reproduce blob.
try:
    import os as _os

    from hypothesis import HealthCheck, settings

    _COMMON = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])
    settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
    settings.register_profile("fuzz", max_examples=5000, derandomize=False, **_COMMON)
    settings.load_profile(_os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # the `test` extra installs hypothesis; without it only the fuzz modules fail to import
    pass
