#!/usr/bin/env bash
# The GPU check (issue #21): CUDA tests + the main jobs timed on the device + exact-bench certification on it,
# written to benchmarks/results/gpu_check.{json,md}. Under 8 minutes on one H100; works offline.
#
#   bash benchmarks/gpu_check.sh                                  # on the GPU machine
#   bash benchmarks/gpu_check.sh --quick                          # 64-px crops, few steps
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --quick     # test the script on a CPU-only machine
#                                                                 # (writes gpu_check_cpu.{json,md} instead)
# Options: --quick, --device cuda|cpu (or GPU_CHECK_DEVICE), --budget SECONDS (GPU_CHECK_BUDGET, default 450),
# PYTHON=... to pick the interpreter, GPU_CHECK_THREADS=N to pin torch's CPU threads. See docs/gpu.md.
set -u
cd "$(dirname "$0")/.."

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#--device=}"; shift ;;
    --cpu) DEVICE=cpu; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

# the interpreter: $PYTHON, else the project's virtualenv, else python3 / python
if [ -z "${PYTHON:-}" ]; then
  for p in .venv/bin/python python3 python; do
    if command -v "$p" >/dev/null 2>&1; then PYTHON="$p"; break; fi
  done
fi
echo "[gpu_check] python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>&1))"

# make the project importable (no network: an editable install without dependencies, only if needed)
probe='import torch, restoreflow, importlib.metadata as m; assert any(e.name == "restoreflow" for e in m.entry_points(group="console_scripts"))'
if ! "$PYTHON" -c "$probe" >/dev/null 2>&1; then
  echo "[gpu_check] restoreflow is not installed: pip install -e . --no-deps --no-build-isolation"
  "$PYTHON" -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -n 3
fi
if ! "$PYTHON" -c "$probe" 2>/tmp/gpu_check_import.err; then
  echo "[gpu_check] WARNING: 'import torch, restoreflow' still fails (missing dependencies?):"
  tail -n 3 /tmp/gpu_check_import.err
  echo "[gpu_check] continuing: the items below record the errors"
fi
"$PYTHON" - <<'EOF' 2>&1 || true
try:
    import torch
    ok = torch.cuda.is_available()
    print(f"[gpu_check] torch {torch.__version__} (CUDA {torch.version.cuda}); CUDA available: {ok}; device: "
          f"{torch.cuda.get_device_name(0) if ok else 'cpu'}")
except Exception as e:
    print(f"[gpu_check] torch: {type(e).__name__}: {e}")
EOF
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "[gpu_check] WARNING: --device cuda but torch sees no CUDA device; every device item will fail" \
       "(GPU_CHECK_DEVICE=cpu tests the script on a CPU)"
fi

exec "$PYTHON" benchmarks/gpu_check.py --device "$DEVICE" ${ARGS[@]+"${ARGS[@]}"}
