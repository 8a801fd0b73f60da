#!/usr/bin/env bash
# AlexNet training-step speed on one GPU, for a GPU machine that has torch and nothing else (no DALI,
# no Ray): fp32 / TF32 / bf16 autocast x NCHW / channels_last x eager / torch.compile x batch 128 / 512,
# on the paper's full-width net (1000 classes, 224 px, SGD momentum 0.9), synthetic tensors on the GPU.
#
#   bash bench/gpu_check.sh            # on the GPU machine; writes $OUT/gpu_check.md and .jsonl
#   bash bench/gpu_check.sh --dry      # anywhere (CPU): tiny width, batch 4, 2 steps, one compiled config:
#                                      # checks the script, not the speed
#
# Environment: OUT (default ./gpu_check_out), BUDGET_S (default 420: configurations that would start after
# this many seconds are listed as skipped, so the run fits a short lease), STEPS (timed steps, default 20),
# BATCHES (default "128 512"), COMPILE (1 = also time torch.compile, default 1).
# Each configuration is independent: one that fails (e.g. out of memory) is reported and the rest go on.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
echo "== gpu_check: $(date -u +%FT%TZ) host $(hostname) dry=$DRY out=$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

DRY=$DRY OUT=$OUT python - <<'PY'
import json, os, sys, time, traceback, platform
import torch

sys.path.insert(0, os.getcwd())
from trainer.model import AlexNet, count_parameters

dry = os.environ["DRY"] == "1"
out_dir = os.environ["OUT"]
budget_s = float(os.environ.get("BUDGET_S", 420))
steps = int(os.environ.get("STEPS", 2 if dry else 20))
warmup = 1 if dry else 5
batches = [int(b) for b in os.environ.get("BATCHES", "4" if dry else "128 512").split()]
with_compile = os.environ.get("COMPILE", "1") == "1"
device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
width = 0.125 if dry else 1.0
if device.type == "cpu" and not dry:
    sys.exit("gpu_check: no CUDA device; run with --dry to check the script on a CPU")

gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"device {gpu}, AlexNet width {width}, steps {steps} (+{warmup} warm-up)", flush=True)


def set_precision(precision):
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32     # off by default for matmuls
    torch.backends.cudnn.allow_tf32 = tf32           # on by default for convolutions: off here for true fp32


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(precision, layout, compiled, batch):
    set_precision(precision)
    torch.manual_seed(0)
    model = AlexNet(1000, width=width).to(device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    step_model = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync()
    first_s = time.perf_counter() - t0          # includes compilation when compiled
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t1
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {float(loss)}")
    return {"ms_per_step": 1000 * elapsed / steps, "images_per_s": batch * steps / elapsed,
            "warmup_s": first_s, "loss": float(loss),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


# Eager first (seconds each), then compiled ones (tens of seconds of compilation each), most telling first,
# so BUDGET_S cuts the least interesting ones.
configs = [(p, l, False, b) for b in batches for p in ("fp32", "tf32", "bf16") for l in ("NCHW", "channels_last")]
compile_order = [("bf16", "channels_last"), ("tf32", "channels_last"), ("fp32", "NCHW"),
                 ("bf16", "NCHW"), ("tf32", "NCHW"), ("fp32", "channels_last")]
if dry:
    compile_order = compile_order[:1]     # enough to prove torch.compile works here
if with_compile:
    configs += [(p, l, True, b) for p, l in compile_order[:3] for b in batches]
    configs += [(p, l, True, b) for p, l in compile_order[3:] for b in batches]
rows, start = [], time.perf_counter()
for precision, layout, compiled, batch in configs:
    row = {"precision": precision, "layout": layout, "compile": compiled, "batch": batch, "device": gpu,
           "width": width, "torch": torch.__version__}
    if time.perf_counter() - start > budget_s:
        row["status"] = f"skipped (past BUDGET_S={budget_s:g})"
    else:
        try:
            row.update(run_config(precision, layout, compiled, batch))
            row["status"] = "ok"
        except Exception as e:  # OOM, a compile failure: report it, keep going
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows.append(row)
    shown = f"{row['images_per_s']:9.1f} img/s {row['ms_per_step']:8.2f} ms/step" if row["status"] == "ok" else row["status"]
    print(f"{precision:>5} {layout:>13} {'compile' if compiled else 'eager':>7} batch {batch:>4}: {shown}", flush=True)

baseline = {r["batch"]: r["images_per_s"] for r in rows
            if r["status"] == "ok" and (r["precision"], r["layout"], r["compile"]) == ("fp32", "NCHW", False)}
lines = [f"AlexNet training steps, width {width}, 1000 classes, 224 px, SGD; {gpu}; torch {torch.__version__}; "
         f"{steps} timed steps after {warmup} warm-up; speed-up vs fp32 NCHW eager at the same batch",
         "", "| batch | precision | layout | compile | images/s | ms/step | speed-up | peak GiB | warm-up s | status |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    cells = [r["batch"], r["precision"], r["layout"], "yes" if r["compile"] else "no"]
    if r["status"] == "ok":
        speedup = f"{r['images_per_s'] / baseline[r['batch']]:.2f}x" if r["batch"] in baseline else ""
        mem = "" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        cells += [f"{r['images_per_s']:.1f}", f"{r['ms_per_step']:.2f}", speedup, mem, f"{r['warmup_s']:.1f}", "ok"]
    else:
        cells += ["", "", "", "", "", r["status"]]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
table = "\n".join(lines)
print("\n" + table, flush=True)
with open(os.path.join(out_dir, "gpu_check.md.tmp"), "w") as f:
    f.write(table + "\n")
os.replace(os.path.join(out_dir, "gpu_check.md.tmp"), os.path.join(out_dir, "gpu_check.md"))
with open(os.path.join(out_dir, "gpu_check.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
print(f"wrote {out_dir}/gpu_check.md and {out_dir}/gpu_check.jsonl", flush=True)
PY

# The paper's two-column split (trainer/parallel.py, docs/model-parallel.md) vs the single-device model on this GPU:
# equivalence check on the GPU, then step-time ratios (bench/split.py; torch only).
if [[ -f bench/split.py ]]; then
  echo "== split vs single (bench/split.py)"
  if [[ $DRY == 1 ]]; then
    python bench/split.py --device cpu --width 0.125 --batch 2 --rounds 1 --steps 1 --json "$OUT/split.jsonl" \
      | tee "$OUT/split.txt" || echo "split check failed (see above)"
  else
    python bench/split.py --device cuda --width 1 --batch 128 --json "$OUT/split.jsonl" \
      | tee "$OUT/split.txt" || echo "split check failed (see above)"
  fi
fi
