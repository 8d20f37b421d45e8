#!/usr/bin/env bash
# Continue training the bundled `default` prior on a lent GPU for a fixed time (issue #16): what is 2-3 hours of
# steps of batch 12 on one CPU core is seconds of batch 128 on an H100. Same data, network and loss as
# scripts/train_default.sh; starts from the bundled weights (--init), cosine learning rate 2e-4 -> 4e-6 over the
# steps that fit the budget (`restoreflow train --time-budget`: the step count is fixed from the first steps' time
# and recorded in the card, so `--steps N` repeats the run).
#
#   bash scripts/gpu_train.sh [SECONDS] [extra `restoreflow train` options]    # default 300 s of training steps
#   GPU_TRAIN_DEVICE=cpu GPU_TRAIN_BATCH=4 bash scripts/gpu_train.sh 20 --dead-leaves 32   # try it on a CPU
#
# Writes into $OUT (the device tool's folder; else runs/gpu-train): default-gpu.safetensors (float16, 8.5 MB),
# default-gpu.json (its card), gpu_train.json (held-out MMSE denoising of the new and the bundled weights, paired,
# two noise seeds) and gpu_train.log. The set-up adds about a minute (data: 256 dead-leaves images made on all
# cores; evaluation). Bundling the result is a separate, reviewed step (docs/training.md).
set -u
cd "$(dirname "$0")/.."
BUDGET="${1:-${GPU_TRAIN_BUDGET:-300}}"
[ $# -gt 0 ] && shift
DEVICE="${GPU_TRAIN_DEVICE:-cuda}"
BATCH="${GPU_TRAIN_BATCH:-128}"
DEST="${OUT:-runs/gpu-train}"
WORK="${GPU_TRAIN_WORK:-$(mktemp -d)}"  # checkpoints (70 MB) stay out of $OUT
mkdir -p "$DEST" "$WORK"
if [ -z "${PYTHON:-}" ]; then
  for p in .venv/bin/python python3 python; do
    if command -v "$p" >/dev/null 2>&1; then PYTHON="$p"; break; fi
  done
fi
probe='import torch, restoreflow, importlib.metadata as m; assert any(e.name == "restoreflow" for e in m.entry_points(group="console_scripts"))'
if ! "$PYTHON" -c "$probe" >/dev/null 2>&1; then
  echo "[gpu_train] restoreflow is not installed: pip install -e . --no-deps --no-build-isolation"
  "$PYTHON" -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -n 3
fi
LOG="$DEST/gpu_train.log"
echo "[gpu_train] device $DEVICE, batch $BATCH, budget $BUDGET s, work folder $WORK" | tee "$LOG"
PYTHONUNBUFFERED=1 "$PYTHON" -c 'import sys; from restoreflow.app.cli import main; sys.argv[0] = "restoreflow"; main()' \
  train --method denoiser --name default --steps 1000000 --time-budget "$BUDGET" --batch "$BATCH" --crop 64 \
  --lr 2e-4 --lr-min-ratio 0.02 --warmup 100 --ema 0.999 --width 32 --dead-leaves 256 --dead-leaves-size 192 \
  --dead-leaves-texture 0.5 --scales 1,0.75,0.5,0.25 --augment --seed 6 --device "$DEVICE" \
  --checkpoint-every 1000 --eval-crops 2 -m arch=resunet -m mult=1,2,4,8 -m blocks=2 -m p_uniform=0.2 \
  -m p_mean=-1.5 -m p_gray=0.15 --init restoreflow/models/weights/default.safetensors --out "$WORK" --quiet "$@" \
  2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "[gpu_train] training failed (see $LOG)"; exit 1; }
"$PYTHON" - "$WORK" "$DEST" "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG"
import json, shutil, sys
from pathlib import Path

import torch

from restoreflow import default_registries
from restoreflow.core.modelcard import load_state_dict, save_weights
from restoreflow.models import data as rfdata
from restoreflow.models.evaluation import evaluate_denoiser
from restoreflow.models.train_loop import load_model

work, dest, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
save_weights(dest / "default-gpu.safetensors", {k: v.half() for k, v in load_state_dict(work / "default.safetensors").items()})
shutil.copy(work / "default.json", dest / "default-gpu.json")
regs = default_registries()
images = rfdata.held_out_images(64, 3, per_image=2).to(device)
models = {"new (float16)": load_model(dest / "default-gpu.safetensors", registries=regs, device=device).denoiser,
          "bundled": load_model("restoreflow/models/weights/default.safetensors", registries=regs, device=device).denoiser}
res = {}
with torch.no_grad():
    for seed in (0, 1):
        res[seed] = {k: evaluate_denoiser(d, images, seed=seed)["psnr"] for k, d in models.items()}
card = json.loads((work / "default.json").read_text())
out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else device, "steps": card["steps"],
       "time_budget": card.get("time_budget"), "train_seconds": card["train_seconds_this_run"],
       "held_out_psnr": res, "gain": {s: {k: round(r["new (float16)"][k] - r["bundled"][k], 4)
                                          for k in r["bundled"]} for s, r in res.items()}}
(dest / "gpu_train.json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
EOF
