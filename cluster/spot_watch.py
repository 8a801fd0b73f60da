#!/usr/bin/env python3
"""Turn a cloud's spot/preemption notice into a Ray drain of this node, so training checkpoints before it goes.

Ray Train reads a node's drain as a preemption notice (``ray.train.get_preemption_info()``, trainer/preemption.py)
only when something drains the node: KubeRay and Ray's autoscaler do for their own scale-downs, but on `ray up`
clusters nothing turns the clouds' own notices into a drain. This script does, on each GPU worker node
(cluster/aws.yaml and gcp.yaml start it next to `ray start`; the KubeRay worker's preStop hook calls ``drain``):

    python cluster/spot_watch.py aws            # poll EC2's spot instance-action (2 min notice) every 5 s
    python cluster/spot_watch.py gcp            # wait on GCE's `preempted` metadata (30 s notice)
    python cluster/spot_watch.py drain --deadline 25 [--address GCS --node-id ID]   # drain now (preStop)

Each runs `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` with N the
seconds left before the cloud takes the node, less ``--margin``. Standard library only, besides the ``ray`` CLI.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

AWS_IMDS = "http://169.254.169.254/latest"
GCE_PREEMPTED = "http://metadata.google.internal/computeMetadata/v1/instance/preempted"
GCE_NOTICE_S = 30   # GCE stops a preempted VM 30 s after the ACPI notice


def aws_seconds_left(instance_action: str, now: float) -> float:
    """Seconds until the ``time`` of EC2's ``spot/instance-action`` document, e.g.
    ``{"action": "terminate", "time": "2026-11-28T14:00:00Z"}``."""
    when = datetime.datetime.strptime(json.loads(instance_action)["time"], "%Y-%m-%dT%H:%M:%SZ")
    return when.replace(tzinfo=datetime.timezone.utc).timestamp() - now


def _get(url: str, headers: dict, timeout: float, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def watch_aws(poll_s: float) -> float:
    """Block until EC2 announces this spot instance's interruption; return the seconds left (IMDSv2)."""
    while True:
        try:
            _, token = _get(f"{AWS_IMDS}/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, 5, "PUT")
            status, body = _get(f"{AWS_IMDS}/meta-data/spot/instance-action", {"X-aws-ec2-metadata-token": token}, 5)
            if status == 200 and body:
                return aws_seconds_left(body, time.time())
        except (OSError, ValueError, KeyError) as e:   # metadata briefly unreachable: try again
            print(f"spot_watch: {e}", file=sys.stderr, flush=True)
        time.sleep(poll_s)


def watch_gcp() -> float:
    """Block until GCE marks this VM preempted; return the seconds left."""
    while True:
        try:
            status, body = _get(GCE_PREEMPTED + "?wait_for_change=true", {"Metadata-Flavor": "Google"}, 3600)
            if status == 200 and body.strip().upper() == "TRUE":
                return float(GCE_NOTICE_S)
        except OSError as e:
            print(f"spot_watch: {e}", file=sys.stderr, flush=True)
            time.sleep(5)


def this_node() -> tuple[str, str]:
    """(GCS address, node id) of the Ray node on this machine."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False, logging_level="ERROR")
    try:
        context = ray.get_runtime_context()
        return context.gcs_address, context.get_node_id()
    finally:
        ray.shutdown()


def drain_command(address: str, node_id: str, seconds: int, why: str) -> list[str]:
    return ["ray", "drain-node", "--address", address, "--node-id", node_id,
            "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", why,
            "--deadline-remaining-seconds", str(max(0, int(seconds)))]


def drain(seconds: float, why: str, address: str | None = None, node_id: str | None = None) -> int:
    if not (address and node_id):
        address, node_id = this_node()
    command = drain_command(address, node_id, int(seconds), why)
    print("spot_watch: " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", choices=["aws", "gcp", "drain"])
    p.add_argument("--deadline", type=float, default=25.0, help="drain: seconds until the node goes")
    p.add_argument("--margin", type=float, default=5.0, help="seconds kept back from the cloud's deadline")
    p.add_argument("--poll", type=float, default=5.0, help="aws: seconds between metadata polls")
    p.add_argument("--address", help="drain: the GCS address (default: this node's cluster)")
    p.add_argument("--node-id", help="drain: the node to drain (default: this machine's)")
    p.add_argument("--why", default="", help="the drain's reason message")
    args = p.parse_args(argv)
    if args.source == "aws":
        left, why = watch_aws(args.poll), "EC2 spot interruption notice"
    elif args.source == "gcp":
        left, why = watch_gcp(), "GCE preemption notice"
    else:
        left, why = args.deadline, "drain requested"
    return drain(left - args.margin, args.why or why, args.address, args.node_id)


if __name__ == "__main__":
    sys.exit(main())
