"""`python -m trainer ablate`: a base and a variant trained through fit in local mode, the report, and resume.

One tiny ablation (width 0.1, 64-pixel crops, two steps per epoch, two epochs, one seed) is interrupted by an
injected error in the base run's second epoch, rerun (the base resumes from its first epoch's checkpoint, the
variant trains), and rerun once more (nothing is retrained; the report is rewritten from the runs' files).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow
TINY = ["--workers", "0", "--batch-size", "16", "--width", "0.1", "--loader", "reference", "--epochs", "2",
        "--set", "data.image_size=64", "--set", "data.num_threads=1", "--set", "train.max_steps_per_epoch=2",
        "--set", "train.log_every=10"]


def ablate(shards, out: Path, *extra: str) -> tuple[int, str]:
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        code = main(["ablate", "--train", str(shards.train), "--val", str(shards.val), "--out", str(out),
                     "--variants", "no-lrn", *TINY, *extra])
    return code, log.getvalue()


def stamp(run: Path) -> dict[str, int]:
    return {name: (run / name).stat().st_mtime_ns for name in ("last.pt", "metrics.jsonl")}


@pytest.fixture(scope="module")
def interrupted(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    base, variant = out / "base" / "seed0", out / "no-lrn" / "seed0"
    with pytest.raises(Exception, match="injected fault"):   # global step 3: the base run's second epoch
        ablate(digits_shards, out, "--set", "fault.raise_at_step=3")
    first = {"base": read_metrics(base), "variant_started": variant.exists(), "report": (out / "ablation.md").exists()}
    code2, log2 = ablate(digits_shards, out)
    after2 = {"base": stamp(base), "variant": stamp(variant)}
    code3, log3 = ablate(digits_shards, out)
    return {"out": out, "first": first, "runs": (code2, log2, after2), "rerun": (code3, log3)}


def test_an_interrupted_run_resumes_through_fit(interrupted):
    first, (code, log, _) = interrupted["first"], interrupted["runs"]
    assert [r["epoch"] for r in first["base"]] == [0]          # stopped in epoch 2, epoch 1 checkpointed
    assert not first["variant_started"] and not first["report"]
    assert code == 0, log
    assert "resumed from" in log and "at epoch 2/2" in log
    base = read_metrics(interrupted["out"] / "base" / "seed0")
    assert [r["epoch"] for r in base] == [0, 1]
    assert base[0] == first["base"][0]                        # epoch 1 was not trained again


def test_finished_runs_are_kept_not_retrained(interrupted):
    code, log = interrupted["rerun"]
    assert code == 0, log
    assert log.count("finished earlier, kept") == 2 and "[trainer] fit:" not in log
    _, _, after2 = interrupted["runs"]
    out = interrupted["out"]
    assert stamp(out / "base" / "seed0") == after2["base"]
    assert stamp(out / "no-lrn" / "seed0") == after2["variant"]


def test_the_report_has_a_row_per_variant_with_the_papers_figures(interrupted):
    out = interrupted["out"]
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == ["base", "no-lrn"]
    assert report["seeds"] == [0] and report["epochs"] == 2 and report["preset"] == "paper"
    for row in rows.values():
        run = row["runs"][0]
        assert run["status"] == "done" and run["epochs"] == 2
        metrics = read_metrics(run["run_dir"])
        assert run["top1_error"] == pytest.approx(1 - metrics[-1]["val_top1"])
        assert run["train_error"] == pytest.approx(1 - metrics[-1]["train_top1"])
        assert row["top1_error"]["mean"] == run["top1_error"] and row["top1_error"]["std"] == 0
    assert rows["base"]["delta_top1_error"] == 0
    assert rows["no-lrn"]["delta_top1_error"] == pytest.approx(
        rows["no-lrn"]["top1_error"]["mean"] - rows["base"]["top1_error"]["mean"])
    assert rows["no-lrn"]["overrides"] == {"model.lrn": False} and rows["no-lrn"]["paper_delta"] == [1.4, 1.2]
    table = (out / "ablation.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| variant")]
    assert [line.split("|")[1].strip() for line in body] == ["base", "no-lrn"]
    assert "+1.4 / +1.2" in body[1]
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*"))


@pytest.mark.parametrize("args, message", [
    (["--variants", "no-such"], "--variants: unknown variant(s) no-such; known: no-lrn,"),
    (["--variant", "mine=model.nope=1"], "--variant mine: unknown config key(s) model.nope"),
    (["--variant", "mine=model.columns=3"], "variant mine: model.columns must be <= 2"),
    (["--variant", "mine"], "--variant 'mine': expected NAME=section.key=value"),
    (["--variants", "one-column", "--parallel", "model", "--gpus-per-worker", "0"],
     "variant one-column: run.parallel=model places the net's two columns on two devices"),
])
def test_a_bad_variant_is_one_line_and_exit_2(args, message, digits_shards, tmp_path, run_main):
    r = run_main("trainer", "ablate", "--train", digits_shards.train, "--val", digits_shards.val,
                 "--out", tmp_path / "a", "--workers", "0", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "a").exists()


def test_a_rerun_with_other_settings_is_refused_before_anything_trains(interrupted, digits_shards, run_main):
    out = interrupted["out"]
    before = stamp(out / "base" / "seed0")
    r = run_main("trainer", "ablate", "--train", digits_shards.train, "--val", digits_shards.val, "--out", out,
                 "--variants", "no-lrn", *TINY, "--set", "optim.lr=0.5")
    assert r.returncode == 2, r.stderr
    assert "holds a run with other settings: optim.lr (" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert stamp(out / "base" / "seed0") == before
