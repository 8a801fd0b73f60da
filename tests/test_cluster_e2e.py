"""End to end on a real local Ray cluster with token authentication, submitted the documented way.

The test starts its own head (`ray start --head --block`) on 127.0.0.1, on free ports and in a private
temp dir and HOME (so `ray get-auth-token --generate` writes the token to *its* ~/.ray/auth_token, exactly
as docs/cluster.md says, without touching the real one), submits through `cluster/submit.sh`, and stops only
the processes it started: everything in the session of the `ray start` process (never a global
`ray stop`, which would kill other people's clusters).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtual environment's `ray`, `python`

pytestmark = pytest.mark.slow


@dataclass
class LocalHead:
    address: str            # the dashboard / job API, http://127.0.0.1:PORT
    env: dict[str, str]     # a client environment that holds the token (HOME/.ray/auth_token)
    home: Path
    log: Path

    def submit(self, *fit_args: str, env: dict[str, str] | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "cluster/submit.sh", *fit_args], cwd=REPO, env=env or self.env,
                              capture_output=True, text=True, timeout=timeout)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s, stat in (line.split() for line in out.splitlines())
            if int(s) == sid and not stat.startswith("Z")]


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops its own services), then SIGKILL whatever of its session is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    for _ in range(10):
        left = session_pids(proc.pid)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        proc.poll()  # reap our own child
    proc.wait(timeout=10)


def wait_for_dashboard(address: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"dashboard at {address} not up after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def local_head():
    # short root: Ray's unix socket paths must stay under 107 characters
    root = Path(tempfile.mkdtemp(prefix="rayt", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert token

    gcs, dash, client, node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = free_ports(9)
    worker_lo = 30000 + (os.getpid() % 300) * 100
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 99}",
           "--num-cpus=4", "--num-gpus=0", f"--temp-dir={root / 'ray'}", "--disable-usage-stats"]
    log = root / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_for_dashboard(address, token, proc, log)
        yield LocalHead(address=address, env=dict(env, RAY_ADDRESS=address), home=home, log=log)
    finally:
        stop_head(proc)
        survivors = session_pids(proc.pid)
        subprocess.run(["rm", "-rf", str(root)], check=False)
        assert not survivors, f"processes of the test's Ray head survived: {survivors}"


def jobs(head: LocalHead) -> dict[str, str]:
    """``{submission_id: status}`` through Ray's job client, authenticated with the head's token."""
    from ray.job_submission import JobSubmissionClient

    token = (head.home / ".ray" / "auth_token").read_text().strip()
    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {token}"})
    return {j.submission_id: str(j.status) for j in client.list_jobs()}


def test_submission_without_the_token_is_refused(local_head):
    before = jobs(local_head)
    no_token = dict(local_head.env, RAY_AUTH_MODE="disabled")
    r = local_head.submit("--help", env=no_token, timeout=120)
    assert r.returncode != 0
    assert "Unauthorized: Missing authentication token" in r.stderr + r.stdout

    wrong = dict(local_head.env, RAY_AUTH_TOKEN="0" * 32)  # RAY_AUTH_TOKEN wins over ~/.ray/auth_token
    r = local_head.submit("--help", env=wrong, timeout=120)
    assert r.returncode != 0
    assert "Invalid authentication token" in r.stderr + r.stdout
    assert jobs(local_head) == before  # neither reached the cluster


def test_training_job_submitted_to_the_cluster_succeeds(local_head, digits_shards, tmp_path):
    """docs/cluster.md's submission, scaled down: shards staged by each node (--stage-to) from a file:// URL,
    two CPU workers, one short epoch; the run dir gets its checkpoint and metrics."""
    import torch

    run, node = tmp_path / "run", tmp_path / "node"
    r = local_head.submit(
        "--train", digits_shards.train.as_uri(), "--val", str(digits_shards.val), "--stage-to", str(node),
        "--out", str(run), "--workers", "2", "--gpus-per-worker", "0", "--epochs", "1", "--width", "0.25",
        "--batch-size", "32", "--loader", "dali",
        "--set", "data.image_size=64", "--set", "train.max_steps_per_epoch=3", timeout=420)
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-4000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", logs).group(0)
    assert jobs(local_head)[job_id] == "SUCCEEDED"

    # staged once on this node (local rank 0), complete, identical to the source
    for split, src in (("train", digits_shards.train), ("val", digits_shards.val)):
        assert sorted(p.name for p in (node / split).iterdir()) == sorted(p.name for p in src.iterdir())
    # (Ray may echo a worker's line twice in the job log: count distinct processes, not lines)
    stagers = set(re.findall(r"pid=(\d+)\S* staged 5 shards to " + re.escape(str(node / "train")) + ": 5 copied",
                             logs))
    assert len(stagers) == 1, [line for line in logs.splitlines() if "staged " in line]

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0]
    assert 0.0 <= lines[0]["val_top1"] <= lines[0]["val_top5"] <= 1.0 and lines[0]["train_loss"] > 0
    state = torch.load(run / "last.pt", weights_only=True)
    assert any(k.endswith("conv1.weight") for k in _flat_keys(state))
    assert list((run / "ray").glob("checkpoint_*/*")), "no Ray Train checkpoint under RUN_DIR/ray"


def _flat_keys(obj, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _flat_keys(v, f"{prefix}{key}.")] or [prefix]
    return [prefix.rstrip(".")]
