#!/usr/bin/env bash
# `make ablate` runs this inside the project's virtual environment: the demo data (scikit-learn's digits, as
# `make demo` shards them), then `python -m trainer ablate` at reduced width in local mode (this process, no
# Ray cluster). Rerunning resumes: finished runs are kept. Digits at width 0.125 are not ImageNet: the table
# shows what each switch does to a small net on a small problem, not the paper's figures.
set -euo pipefail
DATA=${1:-demo_data}
OUT=${ABLATE_OUT:-$DATA/ablation}
if [ ! -f "$DATA/shards/val/manifest.json" ]; then
  echo "== export scikit-learn digits and shard them under $DATA (as make demo does)"
  python -c "from shards.sample_data import export_digits; print(export_digits('$DATA/raw'))"
  python -m shards build "$DATA/raw/train" "$DATA/shards/train" --split train --max-count 512
  python -m shards build "$DATA/raw/val" "$DATA/shards/val" --split val --classes "$DATA/shards/train/classes.json"
fi
# The base is the paper's network and input scale (data.normalize=mean) with the modern recipe (He init,
# warm-up + cosine): the paper's N(0, 0.01) init does not move a net this narrow within a few epochs.
# 64-pixel crops (overlapping and non-overlapping pools both give 1x1 maps into fc6, as both give 6x6 at
# 224); flips off, since a mirrored digit is another glyph.
echo "== ablate -> $OUT"
start=$(date +%s)
python -m trainer ablate --train "$DATA/shards/train" --val "$DATA/shards/val" --out "$OUT" \
    --base-preset modern --seeds "${ABLATE_SEEDS:-2}" --epochs "${ABLATE_EPOCHS:-3}" --workers 0 \
    --batch-size 64 --width 0.125 --set data.normalize=mean --set data.image_size=64 --set data.flip=false \
    --set data.num_threads=1 --set train.log_every=100 --train-error-threshold 0.75 ${ABLATE_ARGS:-}
echo "== wall time $(( $(date +%s) - start )) s; table: $OUT/ablation.md"
cat "$OUT/ablation.md"
