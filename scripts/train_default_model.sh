#!/usr/bin/env bash
# Recipes of the bundled default models, trained with this pack's own trainer on the CC0 /
# public-domain photos inside the scikit-image wheel, astronaut and motorcycle_left held out for
# validation (never trained on). CPU, 2 threads; seeded.
#
#   bash scripts/train_default_model.sh [x2|x4|all]     (default: all)
#
# Writes models/paragonsr_nano_x2.safetensors and/or models/paragonsr_nano_x4.safetensors, their
# records (models/*.json: held-out PSNR, time), their training logs under models/logs/, and the
# plot of both logs, models/training_curves.png.
# RESUME=1 continues an interrupted run from its last periodic save.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
case "$which" in
    x2|x4|all) ;;
    *) echo "usage: $0 [x2|x4|all]" >&2; exit 2 ;;
esac
bash scripts/setup.sh
.venv/bin/pip install --quiet --disable-pip-version-check scikit-image
data=$(.venv/bin/python -c "import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), 'data'))")
work=${WORK:-out/default-model}
rm -rf "$work/train" "$work/val"
mkdir -p "$work/train" "$work/val" models/logs
for name in chelsea.png coffee.png rocket.jpg motorcycle_right.png hubble_deep_field.jpg \
            retina.jpg ihc.png; do
    cp "$data/$name" "$work/train/"
done
cp "$data/astronaut.png" "$data/motorcycle_left.png" "$work/val/"

train() {  # name, then the recipe's own arguments
    local name=$1
    shift
    .venv/bin/paragonsr train --data "$work/train" --val "$work/val" --out "$work/$name" \
        --batch 8 --lq-size 32 --lr 5e-4 --schedule cosine --val-every 500 --save-every 500 \
        --seed 0 --threads 2 ${RESUME:+--resume} "$@"
    cp "$work/$name/model_ema.safetensors" "models/paragonsr_$name.safetensors"
    cp "$work/$name/training_log.csv" "models/logs/paragonsr_$name.csv"
    .venv/bin/python scripts/record_model.py "models/paragonsr_$name.safetensors" \
        "models/logs/paragonsr_$name.csv" --recipe "scripts/train_default_model.sh ${name#nano_}"
}

if [ "$which" = x2 ] || [ "$which" = all ]; then
    train nano_x2 --variant nano --scale 2 --iters 8000
fi
if [ "$which" = x4 ] || [ "$which" = all ]; then
    train nano_x4 --variant nano --scale 4 --iters 24000
fi
plots=()
for name in nano_x2 nano_x4; do
    if [ -f "models/logs/paragonsr_$name.csv" ]; then
        plots+=("${name/_/ }=models/logs/paragonsr_$name.csv")
    fi
done
.venv/bin/python scripts/plot_training.py "${plots[@]}" --out models/training_curves.png
