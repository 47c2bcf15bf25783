"""What entclip's token filters cost inside TRL's GRPOTrainer: TRL plain vs TRL + Clip_B vs TRL + Clip_V.

    .venv/bin/python benchmarks/trl_filters.py                    # tiny model, 8 prompts x 8, 6 tokens, both layouts
    .venv/bin/python benchmarks/trl_filters.py --model smollm2 --layout two-iterations   # SmolLM2-135M, 4 x 4, 32 tokens
    .venv/bin/python benchmarks/trl_filters.py --quick            # the tests' tiny model, a few steps

The three variants are the same TRL 1.16 GRPOTrainer setup (same model folder, prompts, reward,
GRPOConfig: TRL's own generation, fp32, CPU): `plain` is TRL's GRPOTrainer, `clip_b` and `clip_v` are
entclip's EntclipGRPOTrainer (trl_adapter.py) with the released rule. Two layouts of TRL's loop:

- one-update: one optimizer step per generation batch. TRL runs no no-grad forward of its own, so
  the adapter adds one per micro-batch (TRL 1.16's fused LM head yields log p and H only inside the
  training forward, never E_p[S]), plus entclip's chunked token statistics, the filter's reductions
  over processes and the figures it logs.
- two-iterations: num_iterations 2 (entclip's epochs 2), two optimizer steps per generation batch.
  TRL runs its old-log-prob forward, and the adapter computes the statistics in it (perf/stats_shared):
  no forward is added; what remains is the statistics over the vocabulary, the filter and its figures.
  (vLLM's importance-sampling correction, on by default with use_vllm, runs the same forward.)

Timing: each variant trains blocks of --block generation batches in turn (order rotated every round);
a TrainerCallback times each optimizer step from on_step_begin to on_step_end (generation, scoring,
the adapter, the forward/backward and the optimizer step), a generation batch's time is the sum over
its optimizer steps, and the first generation batch of each block is dropped (the loop's start). The
ratios are medians of the variants' times per generation batch, measured side by side in one process
on this shared machine; the spread is over rounds (each round's median ratio).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, set_threads, temp_dir  # noqa: E402

TINY_TESTS = ["max_operand=19", "n_test=50", "tiny_hidden=64", "tiny_layers=2", "tiny_heads=2", "tiny_ffn=128",
              "warmup_max_steps=300", "warmup_target_acc=0.3", "warmup_lr=3e-3"]


def model_and_prompts(args):
    """(model folder, prompt rows, reward function) for --model."""
    from datasets import Dataset

    from entclip.contracts.config import resolve
    from entclip.data.models import load_policy
    from entclip.data.tasks.arithmetic import ArithmeticTask

    if args.model == "smollm2":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from smollm2 import smollm2_folder

        folder = str(smollm2_folder(args.cache or temp_dir("smollm2-")))
    cfg = resolve(sets=TINY_TESTS if args.quick else [])
    if args.model == "tiny":
        if args.cache:
            os.environ["ENTCLIP_CACHE"] = args.cache
        folder = load_policy(cfg, log=lambda s: None)[2]["path"]
    task = ArithmeticTask(max_operand=cfg.max_operand, n_test=cfg.n_test)
    rows = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in task.train])

    def reward(prompts, completions, answer, **_):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    return folder, rows, reward


class StepClock:
    """TrainerCallback: seconds of each optimizer step (on_step_begin to on_step_end)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                clock.t0 = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                clock.times.append(time.perf_counter() - clock.t0)

        self.callback, self.times, self.t0 = CB(), [], 0.0


LAYOUTS = {"one-update": 1, "two-iterations": 2}  # TRL's num_iterations


def build(variant: str, layout: str, folder, rows, reward, args, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from entclip.contracts.config import resolve
    from entclip.training.trl_adapter import EntclipGRPOTrainer

    updates = LAYOUTS[layout]
    grpo = GRPOConfig(output_dir=os.path.join(out, f"{variant}-{layout}"), use_cpu=True, bf16=False, fp16=False,
                      report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
                      max_steps=args.block * updates, num_iterations=updates, dataloader_num_workers=0,
                      per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
                      max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                      beta=0.0, learning_rate=1e-6, lr_scheduler_type="constant")
    model = AutoModelForCausalLM.from_pretrained(folder)
    kw = dict(model=model, reward_funcs=reward, args=grpo, train_dataset=rows,
              processing_class=AutoTokenizer.from_pretrained(folder))
    if variant == "plain":
        trainer = GRPOTrainer(**kw)
    else:
        trainer = EntclipGRPOTrainer(**kw, config=resolve(sets=[f"entropy_control={variant}",
                                                                f"max_new_tokens={args.max_new_tokens}",
                                                                f"epochs={updates}"]))
    trainer.remove_callback(PrinterCallback)
    clock = StepClock()
    trainer.add_callback(clock.callback)
    return trainer, clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both")
    ap.add_argument("--rounds", type=int, default=None, help="blocks per variant (default 12; smollm2 4)")
    ap.add_argument("--block", type=int, default=None,
                    help="generation batches per block, the first not timed (default 6; smollm2 3)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; smollm2 4)")
    ap.add_argument("--group", type=int, default=None, help="completions per prompt (default 8; smollm2 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 6; smollm2 32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="warm-start / conversion cache (default: entclip's / a temp dir)")
    ap.add_argument("--quick", action="store_true", help="the tests' tiny model, 2 rounds of 3 generation batches")
    args = ap.parse_args()
    big = args.model == "smollm2"
    defaults = dict(rounds=2 if args.quick else 4 if big else 12, block=3 if args.quick or big else 6,
                    prompts=4 if big else 8, group=4 if big else 8, max_new_tokens=32 if big else 6)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    warnings.filterwarnings("ignore")
    set_threads(args.threads)
    print(machine())
    folder, rows, reward = model_and_prompts(args)
    out = temp_dir("trl-filters-")
    layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    variants = [(v, lay) for lay in layouts for v in ("plain", "clip_b", "clip_v")]
    built = {v: build(*v, folder, rows, reward, args, out) for v in variants}
    per_round: dict[tuple, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            trainer, clock = built[v]
            clock.times.clear()
            trainer.train()
            n = LAYOUTS[v[1]]
            batches = [sum(clock.times[i:i + n]) for i in range(0, len(clock.times), n)]
            per_round[v].append(statistics.median(batches[1:]))  # the block's first: the loop's start
    print(f"\n{args.model}: {args.prompts} prompts x {args.group} completions, <= {args.max_new_tokens} tokens, "
          f"{args.rounds} rounds x {args.block - 1} timed generation batches per variant")
    print(f"{'layout':15} {'variant':8} {'median s per batch':>18} {'vs plain':>9}  {'per-round ratio min..max':>24}")
    for v in variants:
        plain = (("plain", v[1]))
        med, base = statistics.median(per_round[v]), statistics.median(per_round[plain])
        ratios = [a / b for a, b in zip(per_round[v], per_round[plain])]
        print(f"{v[1]:15} {v[0]:8} {med:18.4f} {med / base:9.3f}  {min(ratios):11.3f} .. {max(ratios):.3f}")


if __name__ == "__main__":
    main()
