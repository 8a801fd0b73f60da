"""Joining or starting the Ray cluster that fit's workers and eval's tasks run on, and sizing fit's workers."""
from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import Mapping

from ray.train import UserCallback

from trainer.console import RunLog


# ---------------------------------------------------------------------------------------- workers

def decide_workers(workers: int | str, gpus_per_worker: float | str, cluster_resources: Mapping[str, float],
                   *, parallel: str = "data") -> tuple[int, float, str]:
    """Resolve ``"auto"`` in ``run.workers`` / ``run.gpus_per_worker`` against the cluster's resources.

    ``"auto"`` GPUs: one per worker (two for ``--parallel model``) when the cluster has that many, else CPU
    workers. ``"auto"`` workers: one per GPU-sized slot of the cluster, or one CPU worker without GPUs.
    Explicit numbers are kept. Returns ``(workers, gpus_per_worker, reason)``; the reason is for the start
    line, e.g. ``4 GPUs found: 4 workers x 1 GPU``."""
    gpus = int(cluster_resources.get("GPU", 0))
    per = 2 if parallel == "model" else 1          # devices one worker trains on
    found = f"{gpus} GPU{_s(gpus)} found" if gpus else "no GPU found"
    if workers != "auto" and gpus_per_worker != "auto":
        found = "as set"
    if gpus_per_worker == "auto":
        need = per * (1 if workers == "auto" else max(1, int(workers)))   # local mode: per torchrun process
        gpus_per_worker = per if gpus >= need else 0
        if gpus and not gpus_per_worker:
            found += (f" (--parallel model needs {per} per worker)" if workers == "auto"
                      else f" ({workers} workers need {need})")
    if workers == "auto":   # explicit GPUs the cluster lacks: one worker, and the placement check says what is missing
        workers = max(1, gpus // int(gpus_per_worker)) if gpus_per_worker else 1
    workers, g = int(workers), float(gpus_per_worker)
    if workers == 0:
        what = f"local mode x {g:g} GPU{_s(g)}" if g else "local mode on the CPU"
    elif g:
        what = f"{workers} worker{_s(workers)} x {g:g} GPU{_s(g)}"
    else:
        what = f"{workers} CPU worker{_s(workers)}"
    idle = gpus - workers * int(g) if g and workers and found != "as set" else 0
    return workers, g, f"{found}: {what}" + (f", {idle} GPU{_s(idle)} left idle" if idle > 0 else "")


def decide_cpus(cpus_per_worker: float | str, gpus_per_worker: float, workers: int, cluster_cpus: float) -> float:
    """Resolve ``"auto"`` in ``run.cpus_per_worker``: a GPU worker gets ``GPU_WORKER_CPUS`` (its DALI decoder
    threads, trainer/config.py ``loader_threads``), at most its share of the cluster's CPUs; a CPU worker 1."""
    from trainer.config import GPU_WORKER_CPUS

    if cpus_per_worker != "auto":
        return float(cpus_per_worker)
    if not gpus_per_worker:
        return 1.0
    share = int(cluster_cpus // max(1, workers)) if cluster_cpus else GPU_WORKER_CPUS
    return float(max(1, min(GPU_WORKER_CPUS, share)))


def _s(n: float) -> str:
    return "" if n == 1 else "s"


def batch_split_error(batch_size: int, workers: int, reason: str) -> str:
    """The one-line refusal when the global batch does not split evenly over the chosen workers."""
    divisor = max(d for d in range(1, workers + 1) if batch_size % d == 0)
    return (f"train.batch_size ({batch_size}) is the global batch and must divide evenly by the {workers} workers "
            f"({reason}); pass --batch-size {max(workers, batch_size // workers * workers)} or --workers {divisor}")


def local_resources() -> dict[str, float]:
    """What a local cluster started by :func:`init_ray` would have."""
    import torch

    return {"CPU": float(os.cpu_count() or 1),
            "GPU": float(torch.cuda.device_count() if torch.cuda.is_available() else 0)}


def joins_existing_cluster() -> bool:
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


# ---------------------------------------------------------------------------------------- cluster

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_ray_environment(verbose: bool) -> None:
    """Settings for the processes Ray starts from here (they inherit this environment).

    - No colour codes around worker-log prefixes when stdout is not a terminal.
    - Ray Train's preemption watcher off: this project does not read ``ray.train.get_preemption_info()``, and
      Ray 2.60's watcher actor takes actor handles as constructor arguments with ``max_restarts=-1``, which
      makes core_worker log an error per worker group ("has constructor arguments in the object store").
    """
    if not verbose and not _stdout_is_terminal():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _stdout_is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()


def init_ray(num_workers: int, cpus_per_worker: float, gpus_per_worker: float, *, verbose: bool = False) -> None:
    """Join RAY_ADDRESS if set (or an already initialised Ray), else start a local cluster.

    Ray's CPU counts are logical, so the local cluster advertises at least one CPU per worker plus one
    for the driver: two CPU workers fit on a 2-core machine (they then share the cores).

    Ray's own INFO lines stay in its log folder unless ``verbose``. A local cluster is started with its
    dashboard's state API, which Ray Train's placement-group cleaner polls every second to see
    whether the run's controller is alive; ``RAY_API_SERVER_ADDRESS`` tells the cleaner where that API is,
    so it does not guess among other Ray instances on the same machine."""
    import ray

    quiet_ray_environment(verbose)
    level = logging.INFO if verbose else logging.WARNING
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_level=level)
        return
    import torch

    need = math.ceil(num_workers * cpus_per_worker)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_per_worker and gpus < num_workers * gpus_per_worker:
        raise ValueError(f"--workers {num_workers} x --gpus-per-worker {gpus_per_worker:g} needs "
                         f"{num_workers * gpus_per_worker:g} GPUs; this machine has {gpus}. Use --gpus-per-worker 0 "
                         f"for CPU workers or set RAY_ADDRESS to a cluster with GPUs")
    if not verbose:   # a new local cluster gets token authentication (Ray's default); its notice says only that
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    dashboard = {}
    if ray._private.utils.get_dashboard_dependency_error() is None:   # a minimal ray[train] has no dashboard:
        port = _free_port()                                             # train without it (the cleaner then warns)
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        dashboard = dict(dashboard_host="127.0.0.1", dashboard_port=port)
    ray.init(num_cpus=max(os.cpu_count() or 1, need + 1), num_gpus=gpus, include_dashboard=bool(dashboard),
             log_to_driver=True, logging_level=level, **dashboard)


def ray_log_dir() -> str | None:
    """This node's Ray log folder (the session's ``logs``), or None without a Ray session."""
    import ray

    try:
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:
        return None


class FailureNotice(UserCallback):
    """Ray Train callback (runs in its controller): one line in train.log per failed worker, in place of the
    controller's multi-line failure report, which stays in Ray's logs."""

    def __init__(self, run_dir: str, max_failures: int):
        self.run_dir, self.max_failures, self.seen = run_dir, max_failures, set()

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            text = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            if not text:
                message = type(error).__name__
            elif "health check failed" in text[0]:   # e.g. the worker process was killed: Ray's own words
                message = text[0]
            else:                                     # a raised error: its traceback's last line
                message = text[-1]
            if (rank, message) in self.seen:
                continue
            self.seen.add((rank, message))
            RunLog(self.run_dir)(f"[trainer] rank {rank} failed: {message} (Ray Train restarts the group from the "
                                 f"last checkpoint up to run.max_failures={self.max_failures} times)")


def wait_for_placement(num_workers: int, per_worker: dict[str, float], timeout_s: float) -> None:
    """Return once the cluster's live nodes can hold every worker (each on one node), or fail after
    ``timeout_s`` (an autoscaling cluster may add nodes meanwhile) instead of waiting forever."""
    import ray

    deadline, fits, nodes = time.monotonic() + timeout_s, 0, []
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = sum(min(int(node.get(k, 0) // v) for k, v in per_worker.items() if v > 0) for node in nodes)
        if fits >= num_workers:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    have = ", ".join("{" + ", ".join(f"{k}: {n.get(k, 0):g}" for k in per_worker) + "}" for n in nodes) or "none"
    want = ", ".join(f"{k}: {v:g}" for k, v in per_worker.items())
    raise ValueError(f"the Ray cluster can place {fits} of {num_workers} workers needing {{{want}}} each "
                     f"(live nodes: {have}) after waiting {timeout_s:g} s (run.placement_timeout_s); lower --workers "
                     f"or run.cpus_per_worker / --gpus-per-worker, or add nodes")
