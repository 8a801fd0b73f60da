"""`python -m trainer ablate`: the paper's design claims, measured on your data (docs/training.md, "Ablations").

One base configuration and named variants, each an ordinary set of config overrides, are trained on the same
data, seeds and budget, every run through :func:`trainer.fit.fit` into its own RUN_DIR (``DIR/<variant>/seed<s>``).
A finished run (all its epochs in metrics.jsonl, last.pt written) is read, not retrained; an unfinished one is
handed to ``fit``, which resumes it from its newest checkpoint. After every run the report is rewritten
(atomically): ``DIR/ablation.json``, ``DIR/ablation.md`` and ``DIR/ablation.png``.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards import fileio
from trainer.config import Config, apply_overrides, parse_set
from trainer.faults import TrainingStopped
from trainer.metrics import read_metrics
from trainer.train import STOPPED


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    paper: str = "not reported"                  # what the paper reports for this change
    paper_delta: tuple[float, float] | None = None   # its top-1 / top-5 error change, points
    custom: bool = False                         # defined on the command line (--variant)


# The paper's claims (sections 3.1-3.4, 4.2). Deltas are error(variant) - error(paper's net), in points.
VARIANTS = [
    Variant("no-lrn", {"model.lrn": False}, "+1.4 / +1.2 (section 3.3)", (1.4, 1.2)),
    Variant("non-overlapping-pool", {"model.pool": "non-overlapping"}, "+0.4 / +0.3 (section 3.4)", (0.4, 0.3)),
    Variant("one-column", {"model.columns": 1}, "+1.7 / +1.2 (section 3.2)", (1.7, 1.2)),
    Variant("no-dropout", {"model.dropout": 0.0}, "substantial overfitting (section 4.2): see the train-val gap"),
    Variant("tanh", {"model.activation": "tanh"},
            "ReLU reaches 25 % training error 6x faster (section 3.1, Figure 1, CIFAR-10)"),
    Variant("normalize-mean", {"data.normalize": "mean"}, "the paper's input: mean subtracted, 0-255 (section 2)"),
    Variant("normalize-standard", {"data.normalize": "standard"}, "not in the paper (mean and std)"),
    Variant("lrn-alpha-paper", {"model.lrn_alpha_convention": "paper"}, "1e-4 per squared neighbour"),
    Variant("lrn-alpha-cuda-convnet", {"model.lrn_alpha_convention": "cuda-convnet"},
            "2e-5 per squared neighbour, what cuda-convnet trained with"),
]
BASE = "base"


def parse_variant(text: str) -> Variant:
    """``NAME=key=value,key=value`` (the values are YAML scalars, as with --set) -> a user's Variant."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise ValueError(f"--variant {text[:80]!r}: expected NAME=section.key=value[,section.key=value...], "
                         f"e.g. --variant wide-fc=model.width=0.5")
    if not name.replace("-", "").replace("_", "").isalnum() or name == BASE:
        raise ValueError(f"--variant {name[:40]!r}: a name is letters, digits, - and _ (and not {BASE!r})")
    try:
        overrides = parse_set([item for item in rest.split(",") if item.strip()])
    except ValueError as e:
        raise ValueError(f"--variant {name}: {e}") from None
    return Variant(name, overrides, "your variant", custom=True)


def choose_variants(base: Config, names: list[str] | None, custom: list[Variant]) -> list[Variant]:
    """The variants to run: ``names`` (built-in or custom) or, by default, every built-in one that changes the
    base plus every custom one. A built-in variant the base already is (e.g. ``normalize-mean`` on the paper
    preset) is left out by default: it would be a second copy of the base."""
    table = {v.name: v for v in VARIANTS}
    seen: set[str] = set()
    for v in custom:
        if v.name in seen:
            raise ValueError(f"--variant {v.name}: defined twice; give each variant its own name")
        seen.add(v.name)
        table[v.name] = v   # a --variant may redefine a built-in name
    if names:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ValueError(f"--variants: unknown variant(s) {', '.join(unknown)}; known: {', '.join(table)} "
                             f"(or define one with --variant NAME=section.key=value)")
        chosen = [table[n] for n in dict.fromkeys(names)]
        return chosen + [v for v in custom if v.name not in names]
    return [v for v in VARIANTS if v.name not in seen and changes(base, v)] + custom


def changes(base: Config, variant: Variant) -> bool:
    return variant_config(base, variant).to_dict() != base.to_dict()


def variant_config(base: Config, variant: Variant) -> Config:
    cfg = copy.deepcopy(base)
    label = f"--variant {variant.name}" if variant.custom else f"variant {variant.name}"
    return apply_overrides(cfg, variant.overrides, label)


@dataclass
class Plan:
    """Every run of the ablation: (variant, seed) -> its config, whose run.out is its RUN_DIR."""
    out: Path
    base: Config
    variants: list[Variant]
    seeds: list[int]
    threshold: float
    runs: dict[tuple[str, int], Config] = field(default_factory=dict)

    @classmethod
    def make(cls, base: Config, out: str, variants: list[Variant], seeds: int, threshold: float) -> "Plan":
        plan = cls(Path(out).resolve(), base, variants, [base.train.seed + i for i in range(seeds)], threshold)
        for variant in [Variant(BASE, {})] + variants:
            for seed in plan.seeds:
                cfg = variant_config(base, variant)
                cfg.train.seed = seed
                cfg.run.out = str(plan.out / variant.name / f"seed{seed}")
                label = f"variant {variant.name}"
                try:
                    cfg.validate()
                except ValueError as e:   # e.g. model.columns=1 with --parallel model
                    raise ValueError(f"{label}: {e}") from None
                plan.runs[(variant.name, seed)] = cfg
        return plan


# What may differ between an ablation's rerun and the runs it finds: where the data is read from and how fast
# (paths are made absolute by fit, "auto" workers resolved), logging, and injected faults.
RUN_ONLY = {"data": {"train", "val", "stage_to", "loader", "num_threads"}, "train": {"log_every", "checkpoint_every"},
            "run": None, "fault": None}


def mismatch(cfg: Config) -> list[str]:
    """The config keys on which the run already in ``cfg.run.out`` (its config.json) differs from ``cfg``."""
    saved = Path(cfg.run.out) / "config.json"
    if not saved.is_file():
        return []
    old, new = json.loads(saved.read_text())["config"], cfg.to_dict()
    keys = []
    for section, values in new.items():
        if not isinstance(values, dict) or (section in RUN_ONLY and RUN_ONLY[section] is None):
            continue
        for key, value in values.items():
            if key not in RUN_ONLY.get(section, set()) and key in old.get(section, {}) and old[section][key] != value:
                keys.append(f"{section}.{key} ({old[section][key]!r} there, {value!r} now)")
    return keys


def finished(cfg: Config) -> bool:
    """All of the run's epochs are in its metrics.jsonl and its model file is written, or it stopped on purpose."""
    run = Path(cfg.run.out)
    if (run / STOPPED).is_file():
        return True
    records = read_metrics(run)
    return bool(records) and records[-1]["epoch"] >= cfg.train.epochs - 1 and (run / "last.pt").is_file()


def run_ablation(plan: Plan, verbose: bool = False, log=print) -> dict[str, Any]:
    """Train every unfinished run through fit (which resumes a half-finished one); rewrite the report after each."""
    from trainer.fit import fit

    started = time.perf_counter()
    total = len(plan.runs)
    for (name, seed), cfg in plan.runs.items():   # refuse before anything trains
        differ = mismatch(cfg)
        if differ:
            raise ValueError(f"{cfg.run.out} holds a run with other settings: {', '.join(differ[:3])}; rerun the "
                             f"ablation with its settings or pass a new --out")
    for i, ((name, seed), cfg) in enumerate(plan.runs.items(), 1):
        if finished(cfg):
            log(f"[ablate] {i}/{total} {name} seed {seed}: finished earlier, kept ({cfg.run.out})")
            continue
        log(f"[ablate] {i}/{total} {name} seed {seed}: training -> {cfg.run.out}")
        try:
            fit(copy.deepcopy(cfg), verbose=verbose)
        except TrainingStopped as e:   # e.g. NaN: the variant diverged; that is a result, not a failure
            log(f"[ablate] {name} seed {seed} stopped: {e}")
        write_report(plan, time.perf_counter() - started)
    report = write_report(plan, time.perf_counter() - started)
    log(f"[ablate] report: {plan.out / 'ablation.md'}, ablation.json, ablation.png")
    return report


# ------------------------------------------------------------------------------------------ the report

def run_result(cfg: Config, threshold: float) -> dict[str, Any]:
    """One run's figures from its metrics.jsonl: the last epoch's errors, and the first epoch whose training
    error (the training forward passes' top-1 misses, as Figure 1 plots) is at or below ``threshold``."""
    run = Path(cfg.run.out)
    records = read_metrics(run)
    result: dict[str, Any] = {"seed": cfg.train.seed, "run_dir": str(run), "epochs": len(records)}
    if (run / STOPPED).is_file():
        result["status"] = "stopped: " + (run / STOPPED).read_text().strip()[:200]
        return result
    if not finished(cfg):
        result["status"] = "pending"
        return result
    last = records[-1]
    result.update(status="done", top1_error=1 - last["val_top1"], top5_error=1 - last["val_top5"],
                  train_error=1 - last["train_top1"] if "train_top1" in last else None,
                  train_errors=[1 - r["train_top1"] for r in records if "train_top1" in r],
                  wall_s=sum(r.get("epoch_time_s", 0.0) for r in records))
    reached = [r["epoch"] + 1 for r in records if "train_top1" in r and 1 - r["train_top1"] <= threshold]
    result["epochs_to_threshold"] = reached[0] if reached else None
    return result


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def build_report(plan: Plan, wall_s: float) -> dict[str, Any]:
    rows = []
    for variant in [Variant(BASE, {}, "the paper's net" if plan.base.preset == "paper" else "-")] + plan.variants:
        runs = [run_result(plan.runs[(variant.name, seed)], plan.threshold) for seed in plan.seeds]
        done = [r for r in runs if r["status"] == "done"]
        row = {"name": variant.name, "overrides": variant.overrides, "paper": variant.paper,
               "paper_delta": list(variant.paper_delta) if variant.paper_delta else None, "runs": runs}
        for key in ("top1_error", "top5_error", "train_error"):
            row[key] = summary([r[key] for r in done if r.get(key) is not None])
        gaps = [r["top1_error"] - r["train_error"] for r in done if r.get("train_error") is not None]
        row["gap"] = summary(gaps)   # val top-1 error minus training error: overfitting
        reached = [r["epochs_to_threshold"] for r in done]
        row["epochs_to_threshold"] = (summary([float(e) for e in reached])
                                      if reached and all(e is not None for e in reached) else None)
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("top1_error", "top5_error"):
            row[f"delta_{key}"] = (row[key]["mean"] - base[key]["mean"]) if row[key] and base[key] else None
    b = plan.base
    described = {"data.normalize": b.data.normalize, "model.lrn_alpha_convention": b.model.lrn_alpha_convention,
                 "model.init": b.model.init, "schedule.kind": b.schedule.kind, "train.batch_size": b.train.batch_size}
    return {"format": "alexnet-pipeline-ablation/1", "out": str(plan.out), "preset": plan.base.preset,
            "base": described,
            "seeds": plan.seeds, "epochs": plan.base.train.epochs, "width": plan.base.model.width,
            "image_size": plan.base.data.image_size, "train_error_threshold": plan.threshold,
            "train": plan.base.data.train, "val": plan.base.data.val, "wall_s": wall_s, "variants": rows}


def pct(stat: dict | None, signed: bool = False) -> str:
    if not stat:
        return "-"
    mean = f"{100 * stat['mean']:+.1f}" if signed else f"{100 * stat['mean']:.1f}"
    return f"{mean} ± {100 * stat['std']:.1f}" if stat.get("n", 1) > 1 else mean


def markdown(report: dict[str, Any]) -> str:
    t = 100 * report["train_error_threshold"]
    lines = [f"# Ablation: preset {report['preset']}, width {report['width']:g}, image size {report['image_size']}, "
             f"{report['epochs']} epochs, seeds {', '.join(map(str, report['seeds']))}",
             "",
             "Base: " + ", ".join(f"{k}={v}" for k, v in report["base"].items()) + ".",
             "",
             "Errors in % on the val set after the last epoch (mean ± std over seeds); Δ = variant - base, in "
             "points; the paper's Δ is for ImageNet at full width (top-1 / top-5). Train error: the training "
             "forward passes' top-1 misses in the last epoch (augmented crops, dropout on).",
             "",
             f"| variant | overrides | top-1 err | top-5 err | Δ top-1 | Δ top-5 | paper | train err | "
             f"val-train gap | epochs to {t:g} % train err (per seed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["variants"]:
        overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "-"
        delta = [f"{100 * d:+.1f}" if d is not None else "-"
                 for d in (row["delta_top1_error"], row["delta_top5_error"])]
        # per seed: the first epoch at or below the threshold, "no" where the run's epochs never got there
        epochs = " / ".join(str(r["epochs_to_threshold"] or "no") for r in row["runs"] if r["status"] == "done") or "-"
        status = {r["status"].split(":")[0] for r in row["runs"]} - {"done"}
        name = row["name"] + (f" ({', '.join(sorted(status))})" if status else "")
        lines.append(f"| {name} | {overrides} | {pct(row['top1_error'])} | {pct(row['top5_error'])} | "
                     f"{delta[0]} | {delta[1]} | {row['paper']} | {pct(row['train_error'])} | "
                     f"{pct(row['gap'], signed=True)} | {epochs} |")
    trained = sum(r.get("wall_s", 0.0) for row in report["variants"] for r in row["runs"])
    lines += ["", f"Wall time of this invocation: {report['wall_s']:.0f} s (the runs' epochs: {trained:.0f} s in all). "
              f"Data: {report['train']} / {report['val']}.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Measured Δ top-1 / top-5 per variant beside the paper's, one bar group per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["variants"] if r["name"] != BASE]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4))
    x = range(len(rows))
    width = 0.2
    for i, (label, get) in enumerate([
            ("measured Δ top-1", lambda r: r["delta_top1_error"]),
            ("measured Δ top-5", lambda r: r["delta_top5_error"]),
            ("paper Δ top-1", lambda r: r["paper_delta"] and r["paper_delta"][0] / 100),
            ("paper Δ top-5", lambda r: r["paper_delta"] and r["paper_delta"][1] / 100)]):
        values = [100 * v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in map(get, rows)]
        ax.bar([p + (i - 1.5) * width for p in x], values, width, label=label,
               hatch="//" if label.startswith("paper") else None, alpha=0.8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), [r["name"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("error change vs base (points)")
    ax.set_title(f"ablation, preset {report['preset']}, width {report['width']:g}, {report['epochs']} epochs, "
                 f"{len(report['seeds'])} seed(s)")
    ax.legend(fontsize=8), ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        with fileio.atomic_write(path) as f:
            fig.savefig(f, dpi=80, format="png")
    finally:
        plt.close(fig)


def write_report(plan: Plan, wall_s: float) -> dict[str, Any]:
    report = build_report(plan, wall_s)
    plan.out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(plan.out / "ablation.json", json.dumps(report, indent=1))
    fileio.write_text(plan.out / "ablation.md", markdown(report))
    plot(report, plan.out / "ablation.png")
    return report
