#!/usr/bin/env bash
# The runs behind README's result tables (same seed, same warm start). ~1 minute each on 2 cores.
# Usage: bash scripts/readme_runs.sh [OUT_DIR]   then   python scripts/runs_table.py OUT_DIR/*
set -euo pipefail
out=${1:-runs/readme}
t() { entclip train --out-dir "$out" --overwrite --quiet "$@"; }
t --name none
t --name clip_b-released --preset clip-b
t --name clip_v-released --preset clip-v
t --name clip_b-mu1 --preset clip-b-active
t --name clip_v-mu1 --preset clip-v-active
for a in pos neg; do for d in pos neg; do t --name "sign-$a-dev$d" --preset "sign-$a-dev$d"; done; done
