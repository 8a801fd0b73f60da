"""bench/gpu_check.sh: the one-GPU check, run in dry mode on the CPU so it cannot rot before a GPU runs it.

The slow test runs the whole script (real shards, real DALI, a real `python -m trainer fit` on Ray, real
bench/split.py) and checks that every step has its row, with pass, in both outputs. The fast tests cover what
the dry run cannot reach: the GPU goals (enforced only on a GPU), a step killed by its budget keeping what it
measured, and the loader's hw_decoder_load setting.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import LoaderConfig

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)   # dataclasses look it up there
spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_dry_run_gives_every_step_a_passing_row(tmp_path, ray_cluster):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DATA": str(tmp_path / "data"),
           "GPU_CHECK_WORK": str(tmp_path / "work"), "RAY_ADDRESS": ray_cluster}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(gpu_check.STEPS)
    failed = {r["step"]: (r["status"], r["figure"]) for r in rows if not r["pass"]}
    assert not failed, failed
    md = (out / "gpu_check.md").read_text()
    for step in gpu_check.STEPS:
        assert sum(line.startswith(f"| {step} |") and line.split("|")[5].strip() == "pass"
                   for line in md.splitlines()) == 1, step
    assert "| step | what | figure | goal | result |" in proc.stdout   # the table is printed at the end
    by_step = {r["step"]: r["details"] for r in rows}
    assert sum(d.get("ok") is True for d in by_step["a"]) == 4           # train paper, rrc, eval, ten-crop
    assert any(d.get("compile") and d.get("source") == "loader" and d["status"] == "ok" for d in by_step["c"])
    fit, ev = by_step["d"]
    assert fit["epochs"] == 2 and ev["n"] == ev["expected_n"] == 32
    assert all(d["ok"] for d in by_step["e"] if d.get("check") == "equivalence")


def test_goals_are_enforced_on_a_gpu_only():
    gpu, dry = gpu_check.make_plan(False), gpu_check.make_plan(True)
    loader = [{"shards": "train_small", "hw_decoder_load": 0.65, "threads": 8, "images_per_s": 24_000.0,
               "status": "ok"},
              {"shards": "train_full", "hw_decoder_load": 1.0, "threads": 16, "images_per_s": 9_000.0,
               "status": "ok"}]
    assert not gpu_check.summary_loader(loader, gpu)["passed"]
    assert gpu_check.summary_loader(loader, dry)["passed"]
    loader[0]["images_per_s"] = 25_000.0
    assert gpu_check.summary_loader(loader, gpu)["passed"]

    def run(batch, compiled, source, rate):
        return {"batch": batch, "compile": compiled, "source": source, "images_per_s": rate, "status": "ok"}
    # the ratio is read at synthetic's best config (batch 512 compiled), not at the best ratio
    training = [run(256, False, "synthetic", 10_000), run(256, False, "loader", 9_900),
                run(512, "inductor", "synthetic", 20_000), run(512, "inductor", "loader", 17_000)]
    summary = gpu_check.summary_training(training, gpu)
    assert not summary["passed"] and "ratio 0.85" in summary["figure"]
    training[-1]["images_per_s"] = 18_000
    assert gpu_check.summary_training(training, gpu)["passed"]


def test_the_diagnostics_are_summed_up_in_one_line_of_the_figure():
    def run(source, ms, status="ok", **host):
        return {"batch": 512, "compile": "inductor", "source": source, "ms_per_step": ms,
                "images_per_s": 512_000 / ms, "status": status, **host}
    details = [run("synthetic", 29.4), run("loader", 48.6, host_next_ms=18.0, host_step_ms=2.1),
               run(gpu_check.LOADER_ALONE, 20.1), run(gpu_check.SIDE_STREAM, 31.5, host_next_ms=1.0, host_step_ms=2.0),
               run(gpu_check.SIDE_BOUND, 1, status="failed: RuntimeError: no"), run(gpu_check.HW_OFF, 47.0)]
    figure = gpu_check.summary_training(details, gpu_check.make_plan(False))["figure"]
    assert ("; at 512c, ms/step: synthetic 29.4, loader alone 20.1 (sum 49.50), loader 48.6 (host in next 18, in step "
            "2.1), loader, side stream 31.5 (host in next 1, in step 2), loader, side stream, outputs bound failed: "
            "RuntimeError: no, loader, hw_decoder_load 0 47") in figure


def test_a_step_killed_by_its_budget_keeps_its_figures_and_the_others_their_rows(tmp_path):
    plan = gpu_check.make_plan(True)
    (tmp_path / "steps").mkdir()
    partial = [{"batch": 8, "compile": False, "source": "synthetic", "images_per_s": 100.0, "status": "ok"},
               {"batch": 8, "compile": False, "source": "loader", "images_per_s": 95.0, "status": "ok"}]
    (tmp_path / "steps" / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in partial) + '{"batch": 16, "comp')
    row = gpu_check.settle("c", tmp_path, plan, rc=124, seconds=120.4, budget=120)
    assert not row["pass"] and row["status"] == "timed out after 120 s"
    assert "ratio 0.95" in row["figure"] and len(row["details"]) == 2   # the line cut by the kill is dropped
    gpu_check.settle("e", tmp_path, plan, rc=0, seconds=1.0, budget=45)   # a step that wrote nothing
    table = gpu_check.report(tmp_path, plan)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert [r.split("|")[1].strip() for r in rows] == list(gpu_check.STEPS)
    assert "FAIL (timed out after 120 s)" in rows[gpu_check.STEPS.index("c")]
    assert "FAIL (not run)" in rows[gpu_check.STEPS.index("d")]
    assert len((tmp_path / "gpu_check.jsonl").read_text().splitlines()) == len(gpu_check.STEPS)


def test_loader_config_hw_decoder_load():
    from pipeline.dali_loader import GPU_DECODER_SETTINGS, gpu_decoder_settings

    for load in (0, 0.65, 1.0):
        cfg = LoaderConfig(shard_dir="shards/train", hw_decoder_load=load)
        assert gpu_decoder_settings(cfg) == {**GPU_DECODER_SETTINGS, "hw_decoder_load": load}
    assert gpu_decoder_settings(LoaderConfig(shard_dir="shards/train"))["hw_decoder_load"] == 0.75
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="LoaderConfig.hw_decoder_load"):
            LoaderConfig(shard_dir="shards/train", hw_decoder_load=bad)


@pytest.mark.parametrize("crop,train,ten_crop", [("paper", True, False), ("rrc", True, False),
                                                 ("paper", False, False), ("paper", False, True)])
def test_gpu_graphs_pass_dalis_operator_checks_without_a_gpu(digits_shards, crop, train, ten_crop):
    """DALI checks every operator's arguments when the graph is defined, before any GPU is touched: the GPU
    decoder settings (hw_decoder_load, paddings, preallocation hints) must be valid for each decoder used."""
    from nvidia.dali.pipeline import Pipeline

    from pipeline.dali_loader import _graph
    from pipeline.shardset import ShardSet

    cfg = LoaderConfig(shard_dir=str(digits_shards.train), device="cuda:0", batch_size=4, image_size=64,
                       resize_shorter=73, crop=crop, ten_crop=ten_crop, hw_decoder_load=0.65)
    shards = ShardSet.open(cfg.shard_dir).shards
    pipe = Pipeline(batch_size=4, num_threads=1, device_id=0)
    with pipe:
        images, labels = _graph(cfg, [s.tar for s in shards], [s.index for s in shards], train=train, seed=1,
                                debug=False, with_source=False)
        pipe.set_outputs(images, labels)
    assert (images.device, labels.device) == ("gpu", "cpu")
