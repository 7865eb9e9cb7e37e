#!/usr/bin/env bash
# Recipe of the bundled default model, models/paragonsr_nano_x2.safetensors: nano x2 trained
# with this pack's trainer on the CC0 / public-domain photos inside the scikit-image wheel,
# astronaut and motorcycle_left held out for validation. CPU, 2 threads; seeded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pip install --quiet --disable-pip-version-check scikit-image
data=$(.venv/bin/python -c "import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), 'data'))")
work=${WORK:-out/default-model}
rm -rf "$work/train" "$work/val"
mkdir -p "$work/train" "$work/val"
for name in chelsea.png coffee.png rocket.jpg motorcycle_right.png hubble_deep_field.jpg \
            retina.jpg ihc.png; do
    cp "$data/$name" "$work/train/"
done
cp "$data/astronaut.png" "$data/motorcycle_left.png" "$work/val/"
.venv/bin/paragonsr train --data "$work/train" --val "$work/val" --out "$work/run" \
    --variant nano --scale 2 --iters 8000 --batch 8 --lq-size 32 --lr 5e-4 \
    --schedule cosine --val-every 500 --save-every 500 --seed 0 --threads 2 ${RESUME:+--resume}
cp "$work/run/model_ema.safetensors" models/paragonsr_nano_x2.safetensors
