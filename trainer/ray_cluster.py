"""Joining or starting the Ray cluster that fit's workers and eval's tasks run on, and sizing fit's workers."""
from __future__ import annotations

import logging
import math
import os
import re
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

def quiet_ray_environment(verbose: bool) -> None:
    """Settings for the processes Ray starts from here (they inherit this environment): no colour codes around
    worker-log prefixes when stdout is not a terminal."""
    if not verbose and not _stdout_is_terminal():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def watch_preemption(on: bool) -> None:
    """Ray Train's preemption watcher (it feeds ``ray.train.get_preemption_info()``), on when fit checks for
    notices (``run.preemption_check_every`` > 0), else off. Ray Train hands this driver's setting to its
    controller. A value set in the environment wins."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1" if on else "0")


def _stdout_is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()


def init_ray(num_workers: int, cpus_per_worker: float, gpus_per_worker: float, *, verbose: bool = False) -> None:
    """Join RAY_ADDRESS if set (or an already initialised Ray), else start a local cluster.

    Ray's CPU counts are logical, so the local cluster advertises at least one CPU per worker plus one
    for the driver: two CPU workers fit on a 2-core machine (they then share the cores).

    Ray's own INFO lines stay in its log folder unless ``verbose``. A local cluster runs without the dashboard
    (:func:`_start_local` says why). On a cluster without one fit starts no placement-group cleaner
    (:func:`lean_torch_trainer`); should Ray start one anyway (another Ray version), its warning at every failed
    try stays in Ray's logs too. On a joined cluster :func:`dashboard_notice` says once what that means."""
    import ray

    quiet_ray_environment(verbose)
    level = logging.INFO if verbose else logging.WARNING
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_level=level)
    else:
        _start_local(num_workers, cpus_per_worker, gpus_per_worker, verbose, level)
    if not verbose:
        hide_console_lines(ConsoleFilter(WATCHER_LINES + (CLEANER_LINES if not _has_dashboard() else ()),
                                         TRACEBACK_AFTER, WITH_TRACEBACK))


def _has_dashboard() -> bool:
    """Whether the cluster this driver is on runs Ray's dashboard (and so its State API): its address, from the
    cluster's own record when joined. A private Ray API, hence the guard."""
    import ray

    try:
        return bool(ray._private.worker._global_node.webui_url)
    except AttributeError:
        return True   # unknown: say nothing, hide nothing


def dashboard_notice() -> str | None:
    """fit's one line on a joined Ray cluster without its dashboard: what is missing, what it costs, the fix; None
    with the dashboard, on a cluster this process started (it ends with fit: the cleaner's work cannot matter)
    or without Ray."""
    import ray

    if not ray.is_initialized() or _started_here or _has_dashboard():
        return None
    return ("[trainer] this Ray cluster runs without its dashboard: no dashboard, so no placement-group cleaner "
            "(Ray Train's asks the dashboard's State API whether the run's controller lives; a driver that dies "
            "may leave the run's placement group reserved). Fix: start its head with "
            '"ray[default]" installed and `ray start --head --include-dashboard=true`')


# Ray Train's default callbacks this trainer leaves out, each the helper actor it starts, a Python process of about
# 2-3 CPU-seconds per worker group (so at every restart and resize): the dataset manager (this trainer hands Ray
# Train no datasets: its own loaders read the shards) and, without the dashboard's State API, the placement-group
# cleaner, which can only fail there (it never removes anything, and warns every second).
UNUSED_CALLBACKS = ("DatasetsCallback",)
UNUSED_WITHOUT_STATE_API = ("PlacementGroupCleanerCallback",)


def lean_callbacks(callbacks: list, state_api: bool) -> list:
    """``callbacks`` less those named in UNUSED_CALLBACKS (and UNUSED_WITHOUT_STATE_API unless ``state_api``)."""
    unused = UNUSED_CALLBACKS + (() if state_api else UNUSED_WITHOUT_STATE_API)
    return [c for c in callbacks if type(c).__name__ not in unused]


def lean_torch_trainer(*args, **kwargs):
    """Ray Train's ``TorchTrainer(*args, **kwargs)`` without the helper actors of :func:`lean_callbacks`. It
    overrides a private method of Ray Train's; where a Ray version lacks it, the trainer is Ray's own, unchanged."""
    from ray.train.torch import TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return lean_callbacks(super()._create_default_callbacks(), _has_dashboard())

    return LeanTorchTrainer(*args, **kwargs)


def _start_local(num_workers: int, cpus_per_worker: float, gpus_per_worker: float, verbose: bool,
                 level: int) -> None:
    import ray
    import torch

    need = math.ceil(num_workers * cpus_per_worker)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_per_worker and gpus < num_workers * gpus_per_worker:
        raise ValueError(f"--workers {num_workers} x --gpus-per-worker {gpus_per_worker:g} needs "
                         f"{num_workers * gpus_per_worker:g} GPUs; this machine has {gpus}. Use --gpus-per-worker 0 "
                         f"for CPU workers or set RAY_ADDRESS to a cluster with GPUs")
    if not verbose:   # a new local cluster gets token authentication (Ray's default); its notice says only that
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # No dashboard: nobody looks at a local cluster's (fit names no address for it), and it is the heaviest part
    # of the start (a dozen Python processes; on two busy cores it has made the node miss Ray's 30 s start-up
    # limit). Its State API would serve only Ray Train's placement-group cleaner, whose work cannot matter for a
    # cluster that ends with fit, and which fit does not start without one (lean_torch_trainer). Should Ray start
    # it anyway (another Ray version), it is pointed at a port where nothing listens, so that it never asks
    # another Ray instance on this machine, which would not know this run's controller and would have the
    # cleaner remove the run's placement group; its failed tries stay in Ray's logs (CLEANER_LINES).
    os.environ["RAY_API_SERVER_ADDRESS"] = NO_STATE_API
    global _started_here
    _started_here = True
    # address="local": a new cluster even where another one (`ray start`, a second fit) runs on this machine;
    # without it ray.init joins that one, refusing the CPU and GPU counts given here
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need + 1), num_gpus=gpus,
             include_dashboard=False, log_to_driver=True, logging_level=level)


_started_here = False   # whether this process started the cluster it is on (_start_local)
# Where Ray Train's placement-group cleaner is sent on a cluster without a dashboard: a port where nothing listens
# (1, privileged), so it never asks another Ray instance on this machine about a run it does not know
NO_STATE_API = "http://127.0.0.1:1"


# Lines of Ray's preemption watcher kept in Ray's logs, off the console: (1) it takes actor handles as
# constructor arguments with max_restarts=-1, so the controller's core worker logs an error once per worker
# group (harmless: a watcher lost with its arguments only means no notice until the next group); (2) its
# warning on a notice, which train.log's "[trainer] preemption notice ..." line says again.
WATCHER_LINES = ("'PreemptionWatcher' and ID", "PreemptionWatcher: preemption detected")

# Ray Train's placement-group cleaner asks the dashboard's State API every second whether the run's controller
# lives; on a cluster without a dashboard every try fails with this warning (part of its wording in Ray 2.60 and
# after), kept off the console there: dashboard_notice's one line says what it means.
CLEANER_LINES = ("State API may be temporarily unavailable",)


# Ray Train controller messages whose traceback stays in Ray's logs. Without a traceback: the message says all
# (an elastic group that does not fit yet is retried at a size that does; train.log says which). With it: a
# worker lost mid-run, which FailureNotice's line in train.log names.
TRACEBACK_AFTER = ("Error in control loop iteration: The worker group startup timed out",)
WITH_TRACEBACK = ("Graceful shutdown of backend failed",)

_TRACEBACK_START = ("Traceback (most recent call last)", "During handling of the above exception",
                    "The above exception was the direct cause")
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def traceback_line(line: str) -> bool:
    """Whether ``line`` can be part of a Python traceback: its header, an indented frame or message line, a blank,
    a chained exception's separator, or the exception line."""
    return (not line.strip() or line[0] in " \t" or line.startswith(_TRACEBACK_START)
            or bool(_EXCEPTION_LINE.match(line)))


class ConsoleFilter:
    """What of Ray's forwarded log lines this driver's console leaves out (Ray's log files keep everything): lines
    containing a marker of ``drop``; the traceback that follows a line containing a marker of ``traceback_after``;
    lines containing a marker of ``with_traceback``, and their traceback. A traceback may continue in the same
    process's next batch, so where one is being left out is kept per process."""

    def __init__(self, drop: tuple[str, ...], traceback_after: tuple[str, ...] = (),
                 with_traceback: tuple[str, ...] = ()):
        self.hidden = drop + with_traceback                          # lines never shown
        self.traceback_starts = traceback_after + with_traceback     # lines whose traceback is not shown
        self._in_traceback: dict[tuple, bool] = {}

    def __call__(self, data: dict) -> dict | None:
        """One batch as Ray's dispatcher hands it over (``{"lines": [...], "pid": ...}``) without the lines left
        out; None when none is left."""
        process = (data.get("ip"), data.get("pid"))
        skipping, kept = self._in_traceback.get(process, False), []
        for line in data.get("lines", []):
            if skipping and traceback_line(line):
                continue
            skipping = any(m in line for m in self.traceback_starts)
            if not any(m in line for m in self.hidden):
                kept.append(line)
        self._in_traceback[process] = skipping
        return {**data, "lines": kept} if kept else None


def hide_console_lines(console: ConsoleFilter) -> None:
    """Leave out of this driver's console what ``console`` says. Wraps the handler ``ray.init(log_to_driver=True)``
    installs (a private Ray API, hence the guard)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for name, handler in list(dispatcher.handlers):
        if name != "ray_print_logs":
            continue
        printer = getattr(handler, "printer", handler)   # a later call's filter replaces an earlier one's

        def filtered(data, printer=printer):
            if (kept := console(data)) is not None:
                printer(kept)
        filtered.printer = printer
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


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

    def __init__(self, run_dir: str, max_failures: int, max_preemption_failures: int = -1):
        self.run_dir, self.max_failures, self.seen = run_dir, max_failures, set()
        self.max_preemption_failures = max_preemption_failures

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            text = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            if not text:
                message = type(error).__name__
            elif "health check failed" in text[0]:   # e.g. the worker process was killed: Ray's own words
                message = text[0]
            else:                                     # a raised error: its traceback's last line
                message = text[-1]
            # Ray Train calls this on every poll while the error stands: one line per worker (actor) and error
            key = (rank, message, getattr(getattr(error, "health_check_failure", error), "actor_id", None))
            if key in self.seen:
                continue
            self.seen.add(key)
            if preempted(error):   # its node was drained for preemption, then went: counted apart
                RunLog(self.run_dir)(f"[trainer] rank {rank} lost with its reclaimed node: {message} (Ray Train "
                                     f"restarts the group from the last checkpoint, up to "
                                     f"run.max_preemption_failures={self.max_preemption_failures} times, -1: always)")
                continue
            RunLog(self.run_dir)(f"[trainer] rank {rank} failed: {message} (Ray Train restarts the group from the "
                                 f"last checkpoint up to run.max_failures={self.max_failures} times)")


def preempted(error: BaseException) -> bool:
    """Whether a worker died with a node that was drained for preemption (Ray marks its actor error)."""
    error = getattr(error, "health_check_failure", error)   # Ray Train wraps the actor's death
    return bool(getattr(error, "preempted", False))


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
