#!/usr/bin/env bash
# The README's first command (`make demo`) runs this inside the project's virtual environment:
# real data (scikit-learn's handwritten digits) -> WebDataset shards -> verify.
# The trainer issue extends it with training and evaluation.
set -euo pipefail
DATA=${1:-demo_data}
mkdir -p "$DATA"
echo "== 1/2 export scikit-learn digits as class folders under $DATA/raw"
python -c "from shards.sample_data import export_digits; print(export_digits('$DATA/raw'))"
echo "== 2/2 shard train and val"
python -m shards build "$DATA/raw/train" "$DATA/shards/train" --split train --max-count 512
python -m shards build "$DATA/raw/val" "$DATA/shards/val" --split val --classes "$DATA/shards/train/classes.json"
python -m shards verify "$DATA/shards/train"
python -m shards verify "$DATA/shards/val"
