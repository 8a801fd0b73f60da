#!/usr/bin/env bash
# The GPU path on one GPU, proved and measured in at most 8 minutes (step logic: bench/gpu_check.py).
#
#   bash bench/gpu_check.sh OUTDIR          # on a GPU machine: torch, numpy, Pillow, scikit-image/-learn,
#                                           # DALI, Ray, WebDataset importable by `python3` (PYTHON overrides)
#   bash bench/gpu_check.sh --dry OUTDIR    # anywhere: every step on the CPU, tiny sizes (about 3 minutes on
#                                           # 2 cores); checks the script, not the speed
#
# Writes OUTDIR/gpu_check.md (one table row per step: what, figure, goal, pass/fail; then each step's details),
# OUTDIR/gpu_check.jsonl (one line per step), OUTDIR/logs/<step>.log, and prints the table at the end;
# exits 0 when every step passed, 1 otherwise.
# Each step runs in its own process under its own timeout; one that fails or times out keeps what it measured
# and costs the others nothing. Budgets in seconds (GPU run; the data build comes first and is reused if
# GPU_CHECK_DATA already holds it):
#
#   data  45  ImageNet-sized photo shards: 12,288 train full size (~500 x 375) and shorter-side 256, 512 val
#   a     35  DALI graph on the GPU: train paper / rrc, eval, ten-crop; GPU vs CPU eval pixels (goal <= 1 level)
#   b     80  loader alone, batch 256: {256, full} shards x hw_decoder_load {0, 0.65, 1} x {4, 8, 16} threads
#             (goal >= 25,000 images/s from the 256 shards)
#   c    145  paper AlexNet, bf16 + channels_last, eager and torch.compile, batch 256 / 512 / 128:
#             synthetic vs DALI-fed images/s (goal: DALI >= 90 % of synthetic at its best config); at the
#             fastest compiled batch: loader alone, side stream, side stream + bound outputs, hw_decoder_load 0
#   d    115  python -m trainer fit --workers 1 --gpus-per-worker 1 --preset modern (bf16, channels_last; compile
#             off: c measures it), 2 epochs x 20 steps of 256, val 512 each epoch; trainer eval on best.pt
#   e     30  bench/split.py --device cuda: split == single, step times (two streams / one / single)
#   f     10  peak GPU memory of c and d
#             steps: 415 s (6.9 min) + data 45 s = 460 s at most, plus ~10 s of import check and report
#
# Environment: PYTHON (default python3), GPU_CHECK_DATA (shards, kept for reruns; default
# $TMPDIR/gpu_check_data/{gpu,dry}), GPU_CHECK_WORK (the fit's run directory), STEPS (default
# "data a b c d e f"), BUDGET_<STEP> (e.g. BUDGET_C=200) to change one budget.
set -uo pipefail
DRY=0
if [[ "${1:-}" == "--dry" ]]; then DRY=1; shift; fi
OUT=${1:-gpu_check_out}
mkdir -p "$OUT/logs" "$OUT/steps" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # Ray Train's workers import the trainer from here

FLAGS=(--out "$OUT")
((DRY)) && FLAGS+=(--dry)
[[ -n "${GPU_CHECK_DATA:-}" ]] && FLAGS+=(--data "$GPU_CHECK_DATA")
[[ -n "${GPU_CHECK_WORK:-}" ]] && FLAGS+=(--work "$GPU_CHECK_WORK")
if ((DRY)); then   # a 2-core CPU shared with other work (the test suite): ceilings against a hang, not speed goals
  declare -A BUDGET=([data]=90 [a]=90 [b]=90 [c]=180 [d]=300 [e]=90 [f]=30)
else
  declare -A BUDGET=([data]=45 [a]=35 [b]=80 [c]=145 [d]=115 [e]=30 [f]=10)
fi

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname): dry=$DRY out=$OUT python=$PY"
((DRY)) || { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; }
# What imports, said once up front: a missing package fails only the steps that need it, named here.
DRY=$DRY "$PY" - <<'PY' || exit 2
import importlib.util, os, sys
def have(name):   # found without importing it: the check costs no seconds
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False
missing = [m for m in ("torch", "numpy", "PIL", "skimage", "sklearn", "yaml", "tqdm", "nvidia.dali", "webdataset",
                       "ray", "ray.train", "matplotlib", "tensorboard") if not have(m)]
print("  packages: " + (f"MISSING {', '.join(missing)}: the steps that need them will fail" if missing else "all found"))
# without ray[default]'s dashboard packages the trainer starts its local Ray cluster without the dashboard
dash = [m for m in ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "opentelemetry", "prometheus_client", "pydantic")
        if not have(m)]
if dash:
    print(f"  Ray dashboard packages absent ({', '.join(dash)}): step d's local cluster runs without the dashboard")
if os.environ["DRY"] == "0":
    import torch
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: {sys.executable} sees no CUDA GPU; run 'bash bench/gpu_check.sh --dry OUTDIR' on a CPU")
PY
for step in ${STEPS:-data a b c d e f}; do rm -f "$OUT/steps/$step.row.json"; done   # other steps' rows stay

run_step() {   # STEP: run it under its budget, then settle its row whatever happened
  local step=$1 var="BUDGET_${1^^}" budget start rc
  budget=${!var:-${BUDGET[$step]}}
  echo "== step $step (budget ${budget} s)"
  start=$(date +%s%N)
  timeout -k 10 "$budget" "$PY" bench/gpu_check.py step "$step" "${FLAGS[@]}" --budget "$budget" </dev/null \
    2>&1 | tee "$OUT/logs/$step.log"
  rc=${PIPESTATUS[0]}
  "$PY" bench/gpu_check.py settle "$step" "${FLAGS[@]}" --budget "$budget" --rc "$rc" \
    --seconds "$(( ($(date +%s%N) - start) / 1000000 ))e-3"
}

for step in ${STEPS:-data a b c d e f}; do
  run_step "$step"
done
echo
"$PY" bench/gpu_check.py report "${FLAGS[@]}"
status=$?   # 0 only when every step passed
echo
echo "wrote $OUT/gpu_check.md and $OUT/gpu_check.jsonl"
exit $status
