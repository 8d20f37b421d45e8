#!/usr/bin/env bash
# The long CPU run behind the next bundled `default` prior (issue #16): a 4.3 M-parameter ResUNet (DRUNet-style,
# noise-level map) trained on scikit-image's training images at four scales plus 256 textured/plain dead-leaves
# images, colour augmentation, 15 % grey crops with channel-identical noise (for the `gray` medical prior).
#
# Chunked and resumable: every chunk of 3000 steps ends with NAME.safetensors + a card holding held-out scores
# (copied to card-STEPS.json), and the next chunk resumes from OUT/checkpoint.pt (written every 250 steps), so a
# session that ends without warning loses at most 250 steps. The learning rate is constant after warm-up
# (--lr-min-ratio 1), so the total may grow from chunk to chunk; a final decay is a separate fine-tune (--init).
#
#   scripts/train_default.sh [OUT] [THREADS]      # default OUT=/work/runs/default-v2, THREADS=2
#
# To run it from a frozen copy of the code while the tree is being edited:
#   git archive HEAD restoreflow plugins | tar -x -C SNAP && mv SNAP/plugins SNAP/restoreflow_plugins
#   PYTHONPATH=SNAP scripts/train_default.sh
set -u
OUT=${1:-/work/runs/default-v2}
THREADS=${2:-2}
RF=${RESTOREFLOW:-restoreflow}
mkdir -p "$OUT"
for total in $(seq 3000 3000 300000); do
  if [ -f "$OUT/default.json" ] && python3 -c "import json,sys; sys.exit(0 if json.load(open('$OUT/default.json'))['steps']>=$total else 1)"; then
    continue
  fi
  R=""; [ -f "$OUT/checkpoint.pt" ] && R="--resume"
  $RF train --method denoiser --name default --steps "$total" --batch 12 --crop 64 --lr 2e-4 --lr-min-ratio 1 \
    --warmup 200 --ema 0.999 --width 32 --dead-leaves 256 --dead-leaves-size 192 --dead-leaves-texture 0.5 \
    --scales 1,0.75,0.5,0.25 --augment --seed 2 --threads "$THREADS" --checkpoint-every 250 --eval-crops 2 \
    -m arch=resunet -m mult=1,2,4,8 -m blocks=2 -m p_uniform=0.2 -m p_mean=-1.5 -m p_gray=0.15 \
    --out "$OUT" --quiet $R >> "$OUT/log.txt" 2>&1 || { echo "chunk $total failed" >> "$OUT/log.txt"; exit 1; }
  cp "$OUT/default.json" "$OUT/card-$total.json"
done
