#!/usr/bin/env bash
# The main job on the embedded default (Fashion-MNIST, CPU): every step is a plain `fv` command,
# so this file doubles as a walk-through. Run it through `make demo` (which sets up first).
# Idempotent: every output is overwritten, and a server left by an interrupted run is stopped first.
set -euo pipefail
OUT=${FV_DEMO_DIR:-runs/demo}
REPO="$OUT/triton-repo"   # its server's state and log go to $REPO.server/
mkdir -p "$OUT"
start=$(date +%s)
step() { printf '\n=== [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
# Whatever happens below, no server is left running when the script ends.
trap 'fv stop --repository "$REPO" >/dev/null 2>&1 || true' EXIT

step "1. Train the classifier (small CNN, 5 epochs on 55k images; 5k held out for stopping rules)"
fv train --data fashion-mnist --epochs 5 --out "$OUT/classifier.safetensors"

step "2. Learn a forget vector for class 'Pullover' (the classifier stays frozen)"
fv learn --classifier "$OUT/classifier.safetensors" --forget-class Pullover --out "$OUT/pullover.safetensors"

step "3. Evaluate: original model vs forget vector (UA / RA / TA / MIA-Efficacy, PNGs)"
fv evaluate --classifier "$OUT/classifier.safetensors" --vector "$OUT/pullover.safetensors" --out-dir "$OUT/eval"

step "4. Export the classifier to ONNX (raw pixels in, logits out; verified against PyTorch)"
fv export classifier --classifier "$OUT/classifier.safetensors" --out "$OUT/classifier.onnx"

step "5. Build the Triton repository: forget step (Pullover) -> classifier as ensemble 'unlearned', plus 'fused'"
fv stop --repository "$REPO"
fv triton build --classifier-onnx "$OUT/classifier.onnx" --vector "$OUT/pullover.safetensors" --fused \
  --out "$REPO" --overwrite

step "6. Serve it: supervised tritonserver on loopback (model control locked by a key) + the nginx gateway"
PUBLIC_PORT=$(python -c 'from fv_serving.net import free_port; print(free_port("127.0.0.1"))')
fv serve --repository "$REPO" --detach --public "127.0.0.1:$PUBLIC_PORT"
fv status --repository "$REPO"

step "7. Infer 2000 test images: the bare classifier on loopback, then the ensemble through the gateway"
fv infer --repository "$REPO" --model classifier --data fashion-mnist --count 2000
fv infer --url "http://127.0.0.1:$PUBLIC_PORT" --repository "$REPO" --data fashion-mnist --count 2000
echo "the bare classifier through the gateway (refused: only the public models are routed):"
fv infer --url "http://127.0.0.1:$PUBLIC_PORT" --model classifier --data fashion-mnist --count 16 || true

step "8. Learn a second vector, for 'Trouser' (the fast preset, no evaluation)"
fv learn --classifier "$OUT/classifier.safetensors" --forget-class Trouser --no-eval \
  --out "$OUT/trouser.safetensors"

step "9. Switch the running server to the Trouser vector (validated first; the classifier stays loaded)"
fv switch --repository "$REPO" --vector "$OUT/trouser.safetensors"
fv infer --repository "$REPO" --data fashion-mnist --count 2000

step "10. Switch forgetting off: the ensemble answers like the original classifier again"
fv switch --repository "$REPO" --off
fv infer --repository "$REPO" --data fashion-mnist --count 2000
fv status --repository "$REPO" --history

step "11. Stop the server"
fv stop --repository "$REPO"

step "done; results in $OUT/ (server log kept in $REPO.server/server.log)"
