"""Shared pytest fixtures: real shards and a local Ray cluster built once per session; commands run in process."""
from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
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


def shared_dir(tmp_path_factory) -> Path:
    """The session's temporary folder that every pytest-xdist worker (and the controlling process) sees."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base   # pytest-N/, above popen-gwK/


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> DigitsShards:
    """Built once per test session, read-only for every test (a test that changes shards copies them first).
    Under pytest-xdist the workers share one copy: the first builds it under a file lock, the others wait."""
    from filelock import FileLock

    from shards.build import BuildConfig, build
    from shards.sample_data import export_digits

    base = shared_dir(tmp_path_factory)
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

# Ray's token authentication, which a new local cluster turns on: a process joins one only with this set before
# it imports Ray (the token itself: ~/.ray/auth_token), so it is set here, for this process and its children.
os.environ.setdefault("RAY_AUTH_MODE", "token")

# Logical CPUs of the session's cluster, shared by every pytest-xdist worker: test_faults' two ranks, test_trainer's
# three eval tasks and the one-worker fits of test_console, test_gpu_check and test_bad_input can meet on it.
RAY_CPUS = 12
RAY_HEAD = Path(__file__).with_name("ray_head.py")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> str:
    """One local Ray cluster for the whole session, however many pytest-xdist workers share it: the first test that
    needs actors starts it (tests/ray_head.py, a process of its own, so it outlives the worker that started it),
    the others join it; the session's end stops it (:func:`pytest_sessionfinish`). Yields its GCS address for
    subprocesses (RAY_ADDRESS); in-process callers (trainer.ray_cluster.init_ray, evaluate) find Ray initialised
    and join it."""
    import ray
    from filelock import FileLock

    from trainer.ray_cluster import NO_STATE_API

    state = shared_dir(tmp_path_factory) / "ray"
    with FileLock(f"{state}.lock"):
        if not (state / "address").is_file():
            state.mkdir(exist_ok=True)
            # the process whose end ends the session: xdist's controller, the parent of each worker
            session = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
            # Without a dashboard, Ray Train's placement-group cleaner (should one run) would ask whichever Ray
            # instance on this machine is newest (another module's cluster, one with a dashboard) whether a run's
            # controller lives, be told no, and remove that run's placement group: it is pointed where nothing
            # answers, as fit does for its own local cluster. The cluster's processes take it from the head's.
            head = subprocess.Popen([sys.executable, str(RAY_HEAD), str(state), str(session), str(RAY_CPUS)],
                                    env={**os.environ, "RAY_API_SERVER_ADDRESS": NO_STATE_API},
                                    stdout=open(state / "head.log", "w"), stderr=subprocess.STDOUT,
                                    start_new_session=True)
            (state / "pid").write_text(str(head.pid))
            deadline = time.monotonic() + 180
            while not (state / "address").is_file():
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the session's Ray cluster did not start; {state / 'head.log'}:\n"
                                + (state / "head.log").read_text()[-3000:])
                time.sleep(0.2)
    address = (state / "address").read_text()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    yield address
    ray.shutdown()


def pytest_sessionfinish(session):
    """The controlling process stops the session's Ray cluster, if one was started, once every test is done."""
    from bench.reclaim import running

    if hasattr(session.config, "workerinput"):   # a pytest-xdist worker: others may still use the cluster
        return
    state = shared_dir(session.config._tmp_path_factory) / "ray"
    if not (state / "pid").is_file():
        return
    (state / "stop").touch()
    pid, deadline = int((state / "pid").read_text()), time.monotonic() + 30
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if running(pid):
        os.killpg(pid, signal.SIGKILL)   # its cluster's processes share its process group (start_new_session)


# ---------------------------------------------------------------- order (make test runs modules in parallel)

# `make test` spreads whole modules over pytest-xdist workers (--dist loadfile) in collection order, so the
# modules that take longest (multi-process Ray runs) are collected first and start at once, and the many
# short modules fill the other workers meanwhile. Longest first, as measured; unlisted modules follow.
LONGEST_FIRST = ("test_faults.py", "test_elastic.py", "test_gpu_check.py", "test_cluster_e2e.py", "test_trainer.py",
                 "test_console.py", "test_elastic_train.py", "test_bad_input.py", "test_local_mode.py",
                 "test_ablate.py", "test_pipeline.py", "test_parallel_fit.py")


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
