#!/usr/bin/env bash
# The runs behind README's result tables: the default and each filter / sign intervention, on every
# seed (each seed has its own warm start, cached after its first run). ~1-1.5 minutes a run on 2 cores (65 runs for 5 seeds).
# Usage: bash scripts/readme_runs.sh [OUT_DIR] [SEEDS]      (with the venv active; SEEDS default 0,1,2,3,4)
#   then  python scripts/runs_table.py OUT_DIR/*             (one row per method: mean ± std over seeds)
# Two halves of the seeds can run side by side, one per core: ... runs/readme 0,2,4 & ... runs/readme 1,3
set -euo pipefail
only=${ONLY:-}  # a regex: run only the names that match it (e.g. ONLY='^none|^sign-.*-s(pos|neg)-')
out=${1:-runs/readme}
seeds=${2:-0,1,2,3,4}
t() {
  local name=$2
  [[ -z $only || $name =~ $only ]] || return 0
  entclip train --out-dir "$out" --overwrite --quiet "$@"
}
for s in ${seeds//,/ }; do
  t --name "none-s$s" --seed "$s"
  t --name "clip_b-released-s$s" --seed "$s" --preset clip-b
  t --name "clip_v-released-s$s" --seed "$s" --preset clip-v
  t --name "clip_b-mu1-s$s" --seed "$s" --preset clip-b-active
  t --name "clip_v-mu1-s$s" --seed "$s" --preset clip-v-active
  for a in pos neg; do for d in pos neg; do
    t --name "sign-$a-dev$d-s$s" --seed "$s" --preset "sign-$a-dev$d"  # sign of S* - E_p[S]
    t --name "sign-$a-s$d-s$s" --seed "$s" --preset "sign-$a-s$d"      # sign of S*
  done; done
done
