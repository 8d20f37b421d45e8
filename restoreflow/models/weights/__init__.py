"""Bundled default models (safetensors weights + JSON model cards), trained by ``restoreflow train``."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent
