"""Steps lost when a spot node is reclaimed, with and without a preemption notice, on a real multi-node Ray cluster
on this machine (with no other Ray cluster running on it)::

    python bench/reclaim.py [--out DIR] [--deadline 8] [--checkpoint-every 0] [--after 12]

Each case starts a Ray cluster (``ray.cluster_utils.Cluster``: a head without CPUs for the driver and Ray Train's
controller, two nodes of one logical CPU each) and ``fit --workers 1-2`` on it (a tiny net on 640 digits,
20 steps an epoch, ``fault.record_keys``), and once the group of two has trained ``--after`` steps:

- ``no notice``: SIGKILLs one node's processes (a reclaim nobody announced);
- ``notice``:    drains that node first (cluster/spot_watch.py, i.e. ``ray drain-node --reason
  DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds D``) and kills it when the group says it has taken
  its last checkpoint before the deadline (or at the deadline).

The restarted group of one resumes from the newest checkpoint; the steps lost are those the killed group trained
that the new group trains again (from the keys each rank records per step). Prints one JSON line per case.
The helpers here also drive tests/test_elastic.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

PER_CLASS = 64                 # 640 training samples: 20 steps of 32 an epoch, every sample in every epoch
RECIPE = ["--gpus-per-worker", "0", "--batch-size", "32", "--width", "0.05", "--loader", "dali",
          "--set", "data.image_size=63", "--set", "data.num_threads=1", "--set", "train.log_every=1",
          "--set", "fault.record_keys=true", "--set", "run.preemption_check_every=2", "--set", "run.resize_check_s=2"]
# quicker reactions than a cloud needs: the watcher's poll, and how long a start of a group that no longer fits
# may wait (Ray's autoscaling coordinator sees a node gone only at its next 20 s tick)
RAY_ENV = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "8"}


# ---------------------------------------------------------------------------------------- data

def small_train_set(raw_train: Path, out: Path, per_class: int = PER_CLASS) -> Path:
    """Shards of the first ``per_class`` images of each class folder under ``raw_train``."""
    from shards.build import BuildConfig, build

    subset = out / "raw"
    for folder in sorted(p for p in raw_train.iterdir() if p.is_dir()):
        (subset / folder.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, subset / folder.name / image.name)
    build(BuildConfig(str(subset), str(out / "train"), "train", max_count=200, seed=0), progress=False)
    return out / "train"


def sample_keys(shard_dir: Path) -> list[str]:
    """Every sample key in a shard directory (the tar members' names without extension)."""
    keys = set()
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys |= {name.rsplit(".", 1)[0] for name in t.getnames()}
    return sorted(keys)


# ---------------------------------------------------------------------------------------- cluster and fit

class LocalCluster:
    """A Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head without CPUs (the driver, Ray Train's
    controller) and nodes of one logical CPU each, so each CPU worker gets its own node.

    The Cluster lives in a child process of its own, which this object drives: ``Cluster`` writes process-wide
    Ray state when it starts and stops nodes (the internal KV client, the address file, a SIGTERM handler),
    which must not touch a Ray session of the calling process (pytest's in-process one)."""

    def __init__(self, nodes: int = 2):
        import multiprocessing

        self._conn, child = multiprocessing.get_context("spawn").Pipe()
        self._proc = multiprocessing.get_context("spawn").Process(target=_serve_cluster, args=(child, nodes),
                                                                   daemon=True)
        self._proc.start()
        self.address, self.nodes = self._call("describe")

    def _call(self, *request):
        self._conn.send(request)
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"cluster {request[0]}: {value}")
        return value

    def add_node(self) -> str:
        """A new node of one CPU; returns its node id."""
        node = self._call("add")
        self.nodes.append(node)
        return node

    def kill_node(self, node_id: str) -> None:
        """SIGKILL every process of that node (its raylet and workers die with it), as a reclaimed VM."""
        self._call("kill", node_id)
        self.nodes.remove(node_id)

    def worker_pids(self, node_id: str) -> list[int]:
        return self._call("pids", node_id)

    def shutdown(self) -> None:
        try:
            self._call("shutdown")
        finally:
            self._conn.close()
            self._proc.join(timeout=60)


def _serve_cluster(conn, nodes: int) -> None:
    from ray.cluster_utils import Cluster

    from trainer.ray_cluster import NO_STATE_API

    # No dashboard, as fit's own local cluster: it is the heaviest part of a start, and with one Ray Train's
    # placement-group cleaner asks whichever Ray instance on this machine is newest (a test's other cluster)
    # whether the run's controller lives; one that does not know it has the cleaner remove the run's placement
    # group. The cluster's processes inherit this, so that nothing here asks another instance.
    os.environ["RAY_API_SERVER_ADDRESS"] = NO_STATE_API
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    by_id = {}
    for _ in range(nodes):
        node = cluster.add_node(num_cpus=1)
        by_id[node.node_id] = node
    while True:
        command, *args = conn.recv()
        try:
            if command == "describe":
                result = (cluster.address, list(by_id))
            elif command == "add":
                node = cluster.add_node(num_cpus=1)
                by_id[node.node_id] = node
                result = node.node_id
            elif command == "kill":
                cluster.remove_node(by_id.pop(args[0]), allow_graceful=False)
                result = None
            elif command == "pids":
                result = worker_pids(by_id[args[0]])
            elif command == "shutdown":
                cluster.shutdown()
                conn.send((True, None))
                return
            conn.send((True, result))
        except Exception as e:   # report it to the caller, keep serving
            conn.send((False, f"{type(e).__name__}: {e}"))


def start_cluster(nodes: int = 2) -> LocalCluster:
    return LocalCluster(nodes)


def start_fit(cluster: LocalCluster, train: Path, val: Path, run: Path, log: Path, epochs: int,
              *extra: str) -> subprocess.Popen:
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(REPO), "RAY_ADDRESS": cluster.address,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "trainer", "fit", "--train", str(train), "--val", str(val), "--out", str(run),
           "--workers", "1-2", "--epochs", str(epochs), *RECIPE, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(what: str, predicate, proc: subprocess.Popen, log: Path, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        if proc.poll() is not None:
            break
        time.sleep(every)
    state = f"exited {proc.returncode}" if proc.poll() is not None else "running"
    raise AssertionError(f"waited {timeout:g} s for {what} (fit {state}); its log:\n" + log.read_text()[-4000:])


def log_lines(run: Path) -> list[str]:
    path = run / "train.log"
    return path.read_text().splitlines() if path.is_file() else []


def drain(cluster: LocalCluster, node_id: str, deadline_s: float) -> None:
    """What a spot reclaim does through KubeRay, Ray's autoscaler or cluster/spot_watch.py."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([sys.executable, str(REPO / "cluster" / "spot_watch.py"), "drain", "--address", cluster.address,
                    "--node-id", node_id, "--deadline", str(deadline_s), "--margin", "0",
                    "--why", "spot reclaim (test)"], env=env, check=True, capture_output=True, timeout=60)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc): a node's workers, or what a killed cluster left behind."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie, exited but not yet reaped by its parent, has)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def worker_pids(node) -> list[int]:
    """The Ray Train worker processes on ``node`` (below its raylet), e.g. to send one a SIGTERM."""
    found = []
    for pid in sorted(descendants(node.all_processes["raylet"][0].process.pid)):
        try:
            if b"RayTrainWorker" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


# ---------------------------------------------------------------------------------------- what was trained

def groups(run: Path) -> list[dict]:
    """The worker groups in start order, from fault.record_keys: ``{"id", "world", "steps": {(epoch, step): keys}}``
    with each step's keys over all ranks."""
    out: dict[int, dict] = {}
    for path in sorted((run / "keys").glob("*-rank*of*.jsonl")):
        group, _, rest = path.stem.partition("-rank")
        world = int(rest.split("of")[1])
        g = out.setdefault(int(group), {"id": int(group), "world": world, "steps": {}})
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:   # the last line of a killed rank
                continue
            g["steps"].setdefault((r["epoch"], r["step"]), []).extend(r["keys"])
    return [out[k] for k in sorted(out)]


def lost_steps(before: dict, after: list[dict]) -> list[tuple[int, int]]:
    """Steps ``before`` trained that the next group trains again: those from the step it resumed at on."""
    resumed = min(after[0]["steps"])
    return sorted(step for step in before["steps"] if step >= resumed)


def epoch_keys(all_groups: list[dict]) -> dict[int, list[str]]:
    """Per epoch, the keys of the steps the optimizer kept: for each step, the last group that trained it."""
    final: dict[tuple[int, int], list[str]] = {}
    for g in all_groups:
        final.update(g["steps"])
    out: dict[int, list[str]] = {}
    for (epoch, _), keys in sorted(final.items()):
        out.setdefault(epoch, []).extend(keys)
    return out


# ---------------------------------------------------------------------------------------- the measurement

def reclaim(case: str, train: Path, val: Path, root: Path, deadline_s: float, after: int, *extra: str) -> dict:
    cluster = start_cluster()
    run, log = root / case.replace(" ", "_"), root / f"{case.replace(' ', '_')}.log"
    proc = start_fit(cluster, train, val, run, log, 8, *extra)
    try:
        first = wait_for(f"{after} steps of two workers", lambda: [g for g in groups(run) if g["world"] == 2
                                                                   and len(g["steps"]) >= after], proc, log, 300)[0]
        t0 = time.monotonic()
        if case == "notice":
            drain(cluster, cluster.nodes[1], deadline_s)
            wait_for("the checkpoint before the deadline", lambda: any("last checkpoint" in x for x in log_lines(run))
                     or time.monotonic() - t0 >= deadline_s, proc, log, deadline_s + 60)
        cluster.kill_node(cluster.nodes[1])
        killed = time.monotonic()
        later = wait_for("the group of one", lambda: [g for g in groups(run) if g["id"] > first["id"] and g["steps"]],
                         proc, log, 300)
        resumed = time.monotonic()
        trained = len(groups(run)[0]["steps"])
        lost = lost_steps(groups(run)[0], later)
    finally:
        stop(proc)
        cluster.shutdown()
    return {"case": case, "steps_trained_by_the_group_of_two": trained, "steps_lost": len(lost),
            "lost": [f"epoch {e + 1} step {s + 1}" for e, s in lost][:6],
            "notice_to_kill_s": round(killed - t0, 1), "kill_to_first_step_of_one_s": round(resumed - killed, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--deadline", type=float, default=8.0, help="seconds from the notice to the node's end")
    p.add_argument("--after", type=int, default=12, help="steps of the group of two before the reclaim")
    p.add_argument("--checkpoint-every", type=int, default=0, help="train.checkpoint_every (0: epoch ends)")
    args = p.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="reclaim"))
    from shards.sample_data import export_digits

    export_digits(root / "raw", size=64)
    train = small_train_set(root / "raw" / "train", root / "data")
    from shards.build import BuildConfig, build

    build(BuildConfig(str(root / "raw" / "val"), str(root / "data" / "val"), "val",
                      classes=str(train / "classes.json"), max_count=200, seed=0), progress=False)
    extra = ["--set", f"train.checkpoint_every={args.checkpoint_every}"]
    for case in ("no notice", "notice"):
        print(json.dumps(reclaim(case, train, root / "data" / "val", root, args.deadline, args.after, *extra)),
              flush=True)


if __name__ == "__main__":
    main()
