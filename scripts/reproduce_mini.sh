#!/usr/bin/env bash
# The miniature reproduction of arXiv 2602.03392's claims (README, "A miniature reproduction"):
# 10 methods x seeds 0-4 on each built-in task (arithmetic, countdown), the sign test on both statistics
# (8 presets x seeds 0-2, arithmetic), the calibration runs (default run, seeds 0-4), then every table and
# plot. Two processes at a time, one thread each (~1 min per arithmetic run, ~2 min per countdown run on
# 2 cores, plus ~2-4 min per new warm start). Usage, with the venv active:
#   bash scripts/reproduce_mini.sh [OUT_DIR]        (default runs; existing run directories are an error)
set -euo pipefail
out=${1:-runs}
half1=none,clip-b-active,clip-b-adaptive,clip-v-active,clip-v-adaptive
half2=clip-higher,entropy-bonus,clip-cov,kl-cov,high-entropy
signs=sign-pos-spos,sign-pos-sneg,sign-neg-spos,sign-neg-sneg,sign-pos-devpos,sign-pos-devneg,sign-neg-devpos,sign-neg-devneg

two() {  # two sweeps side by side; fails if either fails
  "$@" --presets "$half1" & a=$!
  "$@" --presets "$half2" & b=$!
  wait "$a" && wait "$b"
}
two entclip train --seeds 0,1,2,3,4 --out-dir "$out" --name repro-arith --quiet
two entclip train --config presets/countdown.yaml --seeds 0,1,2,3,4 --out-dir "$out" --name repro-countdown --quiet
entclip train --seeds 0,1,2 --presets "${signs%%,sign-pos-devpos*}" --out-dir "$out" --name sign-arith --quiet & a=$!
entclip train --seeds 0,1,2 --presets "sign-pos-devpos${signs##*,sign-pos-devpos}" --out-dir "$out" --name sign-arith --quiet & b=$!
wait "$a" && wait "$b"
entclip train --seeds 0,1,2,3,4 --out-dir "$out" --name calib8 --quiet

for task in arith countdown; do
  python scripts/repro_table.py "$out/repro-$task" --plot "docs/repro-$task.png" > "docs/repro-$task.md"
done
python scripts/runs_table.py "$out"/repro-arith/none-s{0,1,2} "$out"/sign-arith/*-s* > docs/sign-arith.md
python scripts/runs_table.py --calibration "$out"/calib8/none-s* > docs/calibration.md
echo "tables: docs/repro-arith.md docs/repro-countdown.md docs/sign-arith.md docs/calibration.md"
