#!/usr/bin/env bash
# The miniature reproduction of arXiv 2602.03392's main claims on the embedded task (README).
# 8 methods x 3 seeds, ~1 minute per run on 2 cores (plus a ~75 s warm start per new seed).
# Usage: bash scripts/reproduce_mini.sh [OUT_DIR]   (with the venv active)
set -euo pipefail
out=${1:-runs}
entclip train --config presets/mini-repro.yaml --seeds 0,1,2 \
  --presets none,clip-higher,entropy-bonus,high-entropy,kl-cov,clip-b-active,clip-v-active,clip-b-adaptive \
  --out-dir "$out" --name mini-repro --quiet --overwrite
entclip compare "$out/mini-repro" --markdown --plot docs/mini-repro.png
