#!/usr/bin/env bash
# The README's first command (`make demo`) runs this inside the project's virtual environment:
# real data (scikit-learn's handwritten digits) -> WebDataset shards -> verify -> train (2 Ray workers,
# CPU) -> evaluate.
set -euo pipefail
DATA=${1:-demo_data}
mkdir -p "$DATA"
echo "== 1/4 export scikit-learn digits as class folders under $DATA/raw"
python -c "from shards.sample_data import export_digits; print(export_digits('$DATA/raw'))"
echo "== 2/4 shard train and val"
python -m shards build "$DATA/raw/train" "$DATA/shards/train" --split train --max-count 512
python -m shards build "$DATA/raw/val" "$DATA/shards/val" --split val --classes "$DATA/shards/train/classes.json"
python -m shards verify "$DATA/shards/train"
python -m shards verify "$DATA/shards/val"

# ---- training: a reduced-width AlexNet, two Ray Train workers on the CPU (gloo DDP), then eval.
# Width 0.25 and 112-pixel crops keep an epoch to seconds on 2 cores; flips are off because a mirrored
# digit is a different glyph. Everything else is the `modern` preset. Rerunning resumes from RUN_DIR.
RUN="$DATA/run"
EPOCHS=${DEMO_EPOCHS:-6}
echo "== 3/4 train: AlexNet width 0.25, 2 Ray workers on CPU, $EPOCHS epochs -> $RUN"
# (the closing lines give the best epoch, wall time, images/s and where the files and Ray's logs are;
# --verbose would also show Ray's own log lines)
python -m trainer fit --train "$DATA/shards/train" --val "$DATA/shards/val" --out "$RUN" \
    --workers 2 --gpus-per-worker 0 --epochs "$EPOCHS" --batch-size 64 --width 0.25 \
    --set data.image_size=112 --set data.flip=false --set data.num_threads=1 --set train.log_every=10
echo "== 4/4 evaluate the best checkpoint on every val image (centre crop, then the paper's 10 crops)"
python -m trainer eval --checkpoint "$RUN/best.pt" --data "$DATA/shards/val" | tee "$RUN/eval.json"
python -m trainer eval --checkpoint "$RUN/best.pt" --data "$DATA/shards/val" --ten-crop | tee "$RUN/eval_10crop.json"
python -m trainer predict --checkpoint "$RUN/best.pt" "$(ls "$DATA"/raw/val/digit_7/*.jpg | head -1)"
python - "$RUN/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
chance = 0.1
print(f"val top-1 {100 * r['top1']:.1f} % over {r['n']} images (chance {100 * chance:.0f} %)")
sys.exit(0 if r["top1"] > 3 * chance else "val top-1 is not well above chance: see the run's curves.png")
PY
