"""Joining or starting the Ray cluster that fit's workers and eval's tasks run on."""
from __future__ import annotations

import math
import os
import time

import torch


def init_ray(num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Join RAY_ADDRESS if set (or an already initialised Ray), else start a local cluster.

    Ray's CPU counts are logical, so the local cluster advertises at least one CPU per worker plus one
    for the driver: two CPU workers fit on a 2-core machine (they then share the cores)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    need = math.ceil(num_workers * cpus_per_worker)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_per_worker and gpus < num_workers * gpus_per_worker:
        raise ValueError(f"--workers {num_workers} x --gpus-per-worker {gpus_per_worker} needs "
                         f"{num_workers * gpus_per_worker:g} GPUs; this machine has {gpus}. Use --gpus-per-worker 0 "
                         f"for CPU workers or set RAY_ADDRESS to a cluster with GPUs")
    ray.init(num_cpus=max(os.cpu_count() or 1, need + 1), num_gpus=gpus, include_dashboard=False,
             log_to_driver=True)


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
