"""cluster/: the cluster YAMLs pass Ray's own validation, the RayJob matches the documented submission.

Offline checks only (no cloud, no Kubernetes); the end-to-end run on a real local Ray cluster is in
tests/test_cluster_e2e.py.
"""
from __future__ import annotations

import copy
import datetime
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = ["aws.yaml", "gcp.yaml"]
SPOT = {"aws.yaml": lambda nc: nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot",
        "gcp.yaml": lambda nc: {"preemptible": True} in nc.get("scheduling", [])}


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def documented_fit_args() -> list[str]:
    """The `python -m trainer fit` arguments of docs/cluster.md's `cluster/submit.sh -- ...` command."""
    text = (REPO / "docs" / "cluster.md").read_text()
    m = re.search(r"^cluster/submit\.sh -- \\\n((?:.*\\\n)*.*)$", text, re.M)
    assert m, "docs/cluster.md lost its `cluster/submit.sh -- \\` command"
    return shlex.split(m.group(1).replace("\\\n", " "))


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def most_workers(args: list[str]) -> int:
    """``--workers N`` or the MAX of an elastic ``--workers MIN-MAX``."""
    return int(flag(args, "--workers").rpartition("-")[2])


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_passes_rays_validation(name):
    config = prepare_config(copy.deepcopy(load(name)))  # what `ray up` does before launching anything
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    assert all(SPOT[name](t["node_config"]) for t in workers.values()), "GPU workers should be spot/preemptible"


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_worker_counts_fit_the_documented_submission(name):
    config = prepare_config(copy.deepcopy(load(name)))
    args = documented_fit_args()
    gpus_wanted = most_workers(args) * int(flag(args, "--gpus-per-worker"))
    workers = [t for k, t in config["available_node_types"].items() if k != config["head_node_type"]]
    assert all(t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    gpu_capacity = sum(t["max_workers"] * t["resources"]["GPU"] for t in workers)
    assert gpus_wanted <= gpu_capacity


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_secures_the_head_and_uses_shared_storage(name):
    config = load(name)
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "RAY_AUTH_MODE=token ray start --address=" in worker_start
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node
    assert any("-v /mnt/shared:/mnt/shared" in o for o in config["docker"]["run_options"])
    assert flag(documented_fit_args(), "--out").startswith("/mnt/shared/")
    assert any("pip install" in c and "~/alexnet-pipeline" in c for c in config["setup_commands"])


def test_rays_validation_rejects_broken_configs():
    """The checks above are only worth something if Ray's validator refuses a bad file."""
    typo = copy.deepcopy(load("aws.yaml"))
    typo["max_worker"] = typo.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(typo))
    too_many = copy.deepcopy(load("aws.yaml"))
    too_many["available_node_types"]["gpu_worker"]["min_workers"] = too_many["max_workers"] + 1
    with pytest.raises(ValueError, match="smaller than the sum of `min_workers`"):
        validate_config(prepare_config(too_many))


def kuberay_job() -> dict:
    docs = [d for d in yaml.safe_load_all((REPO / "cluster" / "kuberay-rayjob.yaml").read_text()) if d]
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("ray.io/v1", "RayJob")]
    return docs[0]


def test_kuberay_rayjob_runs_the_documented_entrypoint():
    job = kuberay_job()
    assert shlex.split(job["spec"]["entrypoint"]) == ["python", "-m", "trainer", "fit", *documented_fit_args()]
    submit = (REPO / "cluster" / "submit.sh").read_text()
    assert ("ray job submit --address \"$RAY_ADDRESS\" --working-dir . --runtime-env cluster/runtime_env.yaml"
            in submit.replace("\n     ", " "))
    assert '-- python -m trainer fit "$@"' in submit


def test_kuberay_gpu_group_matches_the_workers_and_every_container_has_the_token():
    job = kuberay_job()
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    args = documented_fit_args()
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert int(flag(args, "--gpus-per-worker")) == gpus
    assert most_workers(args) <= group["replicas"] * gpus
    containers = [*spec["headGroupSpec"]["template"]["spec"]["containers"], worker,
                  *job["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "alexnet-ray-token", c["name"]
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert {"/mnt/shared", "/mnt/local"} <= mounts
    assert flag(args, "--stage-to").startswith("/mnt/local/")


def test_runtime_env_is_valid_and_leaves_data_out():
    from ray.runtime_env import RuntimeEnv

    config = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**config)  # Ray's own validation of every field
    assert "working_dir" not in config  # it comes from `--working-dir .`
    for pattern in (".venv/", ".git/", "demo_data/", "runs/", "*.tar", "*.pt"):
        assert pattern in config["excludes"]


# ---------------------------------------------------------------- spot reclaims reach Ray (docs/cluster.md)

@pytest.mark.parametrize("name, source", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_spot_workers_turn_the_clouds_notice_into_a_ray_drain(name, source):
    config = load(name)
    start = " ".join(config["worker_start_ray_commands"])
    assert f"RAY_AUTH_MODE=token nohup python ~/alexnet-pipeline/cluster/spot_watch.py {source} " in start
    assert "spot_watch" not in " ".join(config["head_start_ray_commands"])     # the head is not spot
    if source == "aws":   # IMDSv2 must answer inside the container (one hop more than the host)
        options = config["available_node_types"]["gpu_worker"]["node_config"]["MetadataOptions"]
        assert options["HttpPutResponseHopLimit"] >= 2


def test_kuberay_workers_drain_before_the_pod_goes():
    group = kuberay_job()["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    (worker,) = group["containers"]
    command = shlex.split(worker["lifecycle"]["preStop"]["exec"]["command"][-1].split(";")[0])
    assert command[:3] == ["python", "/home/ray/alexnet-pipeline/cluster/spot_watch.py", "drain"]
    deadline = float(flag(command, "--deadline"))
    # the drain's deadline falls inside the pod's grace period, leaving the kubelet's SIGTERM/SIGKILL after it
    assert deadline <= group["terminationGracePeriodSeconds"]


def test_spot_watch_reads_the_clouds_deadline_and_drains_for_preemption():
    import importlib.util

    spec = importlib.util.spec_from_file_location("spot_watch", REPO / "cluster" / "spot_watch.py")
    spot_watch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spot_watch)
    action = '{"action": "terminate", "time": "2026-11-28T14:02:00Z"}'   # EC2's instance-action document
    now = datetime.datetime(2026, 11, 28, 14, 0, 0, tzinfo=datetime.timezone.utc).timestamp()
    assert spot_watch.aws_seconds_left(action, now) == 120.0
    command = spot_watch.drain_command("10.0.0.1:6379", "ab" * 28, 115.7, "EC2 spot interruption notice")
    assert command[:2] == ["ray", "drain-node"]
    assert flag(command, "--reason") == "DRAIN_NODE_REASON_PREEMPTION"
    assert flag(command, "--deadline-remaining-seconds") == "115"
    assert spot_watch.drain_command("a:1", "n", -3, "late")[-1] == "0"
