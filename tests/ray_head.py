"""The test session's local Ray cluster, in a process of its own: ``python tests/ray_head.py STATE_DIR WATCH_PID CPUS``.

Started by the first pytest-xdist worker that needs Ray (tests/conftest.py, ``ray_cluster``); every worker joins it.
It writes the cluster's GCS address to STATE_DIR/address (temp name, then rename) and holds the cluster until
STATE_DIR/stop appears (the session's end) or WATCH_PID, the pytest process that controls the session, is gone.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: the checkout's packages
from bench.reclaim import running  # noqa: E402


def main(state: Path, watch_pid: int, cpus: int) -> None:
    import ray

    # address="local": a cluster of its own, whatever other Ray instances this machine runs. No worker processes
    # started ahead for this driver, which runs nothing (the tests' drivers get theirs as they need them).
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             _system_config={"prestart_worker_first_driver": False})
    tmp = state / "address.tmp"
    tmp.write_text(ray.get_runtime_context().gcs_address)
    tmp.rename(state / "address")
    try:
        while running(watch_pid) and not (state / "stop").exists():
            time.sleep(0.5)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
