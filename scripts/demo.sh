#!/usr/bin/env bash
# The main job on the embedded default (Fashion-MNIST, CPU): every step is a plain `fv` command,
# so this file doubles as a walk-through. Run it through `make demo` (which sets up first).
set -euo pipefail
OUT=${FV_DEMO_DIR:-runs/demo}
mkdir -p "$OUT"
step() { printf '\n=== %s\n' "$*"; }
start=$(date +%s)

step "1. Train the classifier (small CNN, 5 epochs on 55k images; 5k held out for stopping rules)"
fv train --data fashion-mnist --epochs 5 --out "$OUT/classifier.safetensors"

step "2. Learn a forget vector for class 'Pullover' (the classifier stays frozen)"
fv learn --classifier "$OUT/classifier.safetensors" --forget-class Pullover --out "$OUT/pullover.safetensors"

step "3. Evaluate: original model vs forget vector (UA / RA / TA / MIA-Efficacy, PNGs)"
fv evaluate --classifier "$OUT/classifier.safetensors" --vector "$OUT/pullover.safetensors" --out-dir "$OUT/eval"

step "done in $(( $(date +%s) - start )) s; results in $OUT/"
