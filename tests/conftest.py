"""Shared pytest fixtures: real shards and a local Ray cluster built once per session; commands run in process."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
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
    """Built once per test session, read-only for every test (a test that changes shards copies them first).
    Under pytest-xdist the workers share one copy: the first builds it under a file lock, the others wait."""
    from filelock import FileLock

    from shards.build import BuildConfig, build
    from shards.sample_data import export_digits

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent   # pytest-N/, above each worker's popen-gwK/
    root = base / "digits"
    done = root / "built"
    with FileLock(str(base / "digits.lock")):
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)   # left half-built by an interrupted worker
            export_digits(root / "raw", size=64)
            train, val = root / "shards" / "train", root / "shards" / "val"
            build(BuildConfig(str(root / "raw" / "train"), str(train), "train", max_count=300, seed=0),
                  progress=False)
            build(BuildConfig(str(root / "raw" / "val"), str(val), "val", classes=str(train / "classes.json"),
                              max_count=200, seed=0), progress=False)
            done.touch()
    return DigitsShards(train=root / "shards" / "train", val=root / "shards" / "val", raw=root / "raw")


# ---------------------------------------------------------------- commands in process

MAINS = {"shards": "shards.__main__", "pipeline": "pipeline.__main__", "trainer": "trainer.cli"}


@pytest.fixture
def run_main(capfd):
    """``python -m PACKAGE ARGS`` as ``main(ARGS)`` in this process: the imports are paid once per session
    instead of once per call. Returns what subprocess.run would (file descriptors 1 and 2 captured)."""
    def run(package: str, *args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        main = importlib.import_module(MAINS[package]).main
        capfd.readouterr()
        try:
            code = main(argv)
        except SystemExit as e:   # argparse's own refusals
            code = e.code
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([package, *argv], code, out, err)
    return run


# ---------------------------------------------------------------- Ray

# Logical CPUs of the shared cluster: the most any module runs at once is four 2-worker fits (test_faults).
RAY_CPUS = 8


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """One local Ray cluster for every module whose tests need actors, started on first use (Ray's start-up
    costs seconds, paid once per session); yields its GCS address for subprocesses (RAY_ADDRESS). In-process
    callers (trainer.ray_cluster.init_ray, evaluate) find Ray initialised and join it."""
    import ray

    if not ray.is_initialized():
        # Without a dashboard, Ray Train's placement-group cleaner would ask whichever Ray instance on this machine
        # is newest (another module's cluster, one with a dashboard) whether a run's controller lives, be told no,
        # and remove that run's placement group: it is pointed where nothing answers (as fit does for its own
        # local cluster). The cluster's processes take the variable at their start; the test process's other
        # children do not.
        from trainer.ray_cluster import NO_STATE_API

        before = os.environ.get("RAY_API_SERVER_ADDRESS")
        os.environ["RAY_API_SERVER_ADDRESS"] = NO_STATE_API
        try:
            # address="local": its own cluster, whatever other test processes (pytest-xdist workers) run
            ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
        finally:
            if before is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS")
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = before
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# ---------------------------------------------------------------- order (make test runs modules in parallel)

# `make test` spreads whole modules over pytest-xdist workers (--dist loadfile) in collection order, so the
# modules that take longest (multi-process Ray runs) are collected first and start at once, and the many
# short modules fill the other workers meanwhile. Longest first, as measured; unlisted modules follow.
LONGEST_FIRST = ("test_faults.py", "test_trainer.py", "test_elastic.py", "test_gpu_check.py", "test_cluster_e2e.py",
                 "test_ablate.py", "test_elastic_train.py", "test_local_mode.py", "test_console.py",
                 "test_bad_input.py", "test_parallel_fit.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: test order kept within a module


# ---------------------------------------------------------------- Hypothesis profiles (fuzz tests)

# "ci", the default: a fixed seed (derandomize) and 200 examples per property, sized for the suite's time
# budget; a property that needs another count scales settings.default.max_examples. "fuzz" (`make fuzz`,
# HYPOTHESIS_PROFILE=fuzz): 25 times more examples from a random seed; a failure prints its reproduce blob.
try:
    from hypothesis import HealthCheck, settings

    _COMMON = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])
    settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
    settings.register_profile("fuzz", max_examples=5000, derandomize=False, **_COMMON)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # the `test` extra installs hypothesis; without it only the fuzz modules fail to import
    pass
