"""entclip vs TRL's GRPOTrainer vs a minimal hand-written GRPO step, on the embedded tiny task.

TRL is not a dependency of entclip; this script runs in a venv of its own:

    python3 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install -q -c constraints-cpu.txt torch==2.13.0 trl==1.16.0 -e .
    /tmp/trl-venv/bin/python benchmarks/vs_trl.py            # 1M model, 8 x 8, 200 steps each
    /tmp/trl-venv/bin/python benchmarks/vs_trl.py --quick    # tests' tiny model, 8 steps each

What is held equal: the same warm-started model folder and tokenizer (bos-prefixed "a+b=" prompts),
the same arithmetic prompts and exact-match reward, 8 prompts x group size 8 = 64 sequences per
step, the same max_new_tokens, sampling at T=1 with top_k=0 / top_p=1 through HF generate with
the KV cache, exactly one AdamW update per rollout batch (lr 1e-4 constant, weight decay 0, grad
clip 1.0, PPO clip 0.2, token-mean loss = TRL's `dapo`, group-std-scaled advantages, no KL and no
reference model), fp32, CPU, the same thread count.

What differs, by design of each: entclip takes a no-grad forward first (`passes.statistics`: old
log-probs and the token statistics the filters and metrics need); TRL with num_iterations=1 reuses
the training forward's detached log-probs instead and computes the entropy in its loss pass; the
floor does neither. Completion lengths are printed to show that all generate about as many tokens.

Timing: TRL's own training loop drives the order. A callback records each TRL step (on_step_begin
to on_step_end, plus the loop's time between steps: logging, batch fetch) and, right after it, runs
one step of each other variant in rotated order; their time is excluded from TRL's.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, median, set_threads, spread, table, temp_dir  # noqa: E402

VENV_HINT = """trl is not importable in this interpreter ({exe}).
The TRL comparison runs in its own venv (TRL is not an entclip dependency). From the repo root:

    python3 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install -q -c constraints-cpu.txt torch==2.13.0 trl==1.16.0 -e .
    /tmp/trl-venv/bin/python benchmarks/vs_trl.py
"""

TINY = {  # tests/conftest.py TINY (model and task part): for --quick
    "max_operand": 19, "n_test": 50, "tiny_hidden": 64, "tiny_layers": 2, "tiny_heads": 2,
    "tiny_ffn": 128, "warmup_max_steps": 300, "warmup_target_acc": 0.3, "warmup_lr": 3e-3,
}


class FloorGRPO:
    """The least a GRPO step can do: sample, score, one forward/backward of the clipped surrogate.

    One update per batch, so the old log-probs are the detached current ones (ratio = 1 in value,
    gradient A * grad log p); token-mean over valid tokens; grad clip 1.0; AdamW.
    """

    def __init__(self, path, task, prompts, group, max_new, lr, seed):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.task, self.P, self.G, self.max_new = task, prompts, group, max_new
        self.rng = random.Random(seed)
        self.lengths: list[float] = []

    def step(self) -> None:
        torch = self.torch
        probs = self.rng.sample(self.task.train, self.P)
        enc = self.tok([p.prompt for p in probs for _ in range(self.G)], return_tensors="pt", padding=True)
        self.model.eval()
        with torch.no_grad():
            seq = self.model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                      max_new_tokens=self.max_new, pad_token_id=self.tok.pad_token_id,
                                      eos_token_id=self.tok.eos_token_id)
        comp = seq[:, enc["input_ids"].shape[1]:]  # (B, T)
        eos = (comp == self.tok.eos_token_id).int()
        mask = ((eos.cumsum(1) - eos) == 0).float()  # up to and including the first EOS
        texts = self.tok.batch_decode(torch.where(mask.bool(), comp, self.tok.pad_token_id),
                                      skip_special_tokens=True)
        answers = [p.answer for p in probs for _ in range(self.G)]
        r = torch.tensor([self.task.reward(t, a) for t, a in zip(texts, answers)]).view(self.P, self.G)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)  # (B, 1)
        self.model.train()
        am = torch.cat([enc["attention_mask"], torch.ones_like(comp)], dim=1)
        pos = (am.cumsum(1) - 1).clamp(min=0)  # left padding: positions as generate used them
        T = comp.shape[1]
        logits = self.model(input_ids=seq, attention_mask=am, position_ids=pos,
                            logits_to_keep=T + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        surr = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        loss = -(surr * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.lengths.append(float(mask.sum(1).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps per variant")
    ap.add_argument("--max-new-tokens", type=int, default=6, help="entclip's default is 6")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="warm-start cache (default: entclip's)")
    ap.add_argument("--quick", action="store_true", help="tiny model in a temporary cache, 8 steps")
    args = ap.parse_args()

    try:
        import trl
    except ImportError:
        print(VENV_HINT.format(exe=sys.executable))
        return

    model_sets = []
    if args.quick:
        args.steps = min(args.steps, 8)
        model_sets = [f"{k}={v}" for k, v in TINY.items()]
        args.cache = args.cache or temp_dir("entclip-bench-cache-")
    if args.cache:
        os.environ["ENTCLIP_CACHE"] = args.cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not ours
    print(f"machine: {machine()}")
    set_threads(args.threads)
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from entclip.training import engine
    from entclip.contracts.config import resolve
    from entclip.data.models import load_policy
    from entclip.data.tasks.arithmetic import ArithmeticTask

    print(f"trl {trl.__version__}, transformers {transformers.__version__}")
    total = args.warmup + args.steps
    common = model_sets + ["prompts_per_step=8", "group_size=8", f"max_new_tokens={args.max_new_tokens}",
                           "lr=1e-4", "lr_schedule=constant", "weight_decay=0", "max_grad_norm=1.0",
                           "eps_low=0.2", "eps_high=0.2", "loss_agg=token-mean", "scale_std=true",
                           "kl_coef=0", "temperature=1.0", "minibatches=1", "epochs=1", "device=cpu",
                           f"threads={args.threads}", f"steps={total}"]
    cfg0 = resolve(sets=common)
    _, _, ws = load_policy(cfg0, log=lambda s: print("  " + s))
    path = ws["path"]
    task = ArithmeticTask(max_operand=cfg0.max_operand, n_test=cfg0.n_test)

    runners = {}
    # clip_v+accounting runs at the default cadence (accounting_every): its mean step, not its median,
    # is what a run pays; the every-step variants give the cost of one accounted step of each unit.
    entclip_variants = {"entclip": ["entropy_control=none", "entropy_accounting=false"],
                        "entclip clip_v+accounting": ["entropy_control=clip_v", "entropy_accounting=true"],
                        "entclip clip_v+accounting every step": ["entropy_control=clip_v", "entropy_accounting=true",
                                                                 "accounting_every=1"],
                        "entclip clip_v+accounting every step, unit=step": [
                            "entropy_control=clip_v", "entropy_accounting=true", "accounting_every=1",
                            "accounting_unit=step"]}
    for name, extra in entclip_variants.items():
        tr = engine.Trainer(resolve(sets=common + extra), None, log=lambda s: None, model_path=path)
        runners[name] = tr.step
    floor = FloorGRPO(path, task, 8, 8, args.max_new_tokens, 1e-4, seed=0)
    runners["floor (hand-written)"] = lambda i: floor.step()
    lengths = {name: [] for name in entclip_variants}

    rec = {name: [] for name in ["TRL GRPOTrainer", *runners]}
    trl_gap: list[float] = []
    trl_len: list[float] = []

    class Interleave(TrainerCallback):
        """Times TRL's steps and runs the other variants between them."""

        t_begin = t_after = None

        def on_step_begin(self, a, state, control, **kw):
            self.t_begin = time.perf_counter()
            if self.t_after is not None and state.global_step >= args.warmup:
                trl_gap.append(self.t_begin - self.t_after)  # TRL's loop outside the step

        def on_step_end(self, a, state, control, **kw):
            i = state.global_step
            if i > args.warmup:
                rec["TRL GRPOTrainer"].append(time.perf_counter() - self.t_begin)
            if torch.get_num_threads() != args.threads:
                raise RuntimeError(f"thread count changed to {torch.get_num_threads()}")
            names = list(runners)
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t = time.perf_counter()
                m = runners[name](i)
                dt = time.perf_counter() - t
                if i > args.warmup:
                    rec[name].append(dt)
                    if m is not None:
                        lengths[name].append(m["length/mean"])
            self.t_after = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                trl_len.append(logs["completions/mean_length"])

    def reward(prompts, completions, answer, **kw):
        return [task.reward(c, a) for c, a in zip(completions, answer)]

    out_dir = temp_dir("trl-bench-")
    targs = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to="none", disable_tqdm=True,
        save_strategy="no", logging_steps=10, seed=0, max_steps=total, dataloader_num_workers=0,
        per_device_train_batch_size=64, gradient_accumulation_steps=1, num_generations=8,
        generation_batch_size=64, num_iterations=1, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_k=0, top_p=1.0, beta=0.0, epsilon=0.2, loss_type="dapo",
        scale_rewards="group", learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0,
    )
    ds = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in task.train])
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=reward, args=targs,
                          train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(path),
                          callbacks=[Interleave()])
    trainer.remove_callback(PrinterCallback)  # its log dicts would bury the table (logging still runs)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    trainer.train()
    print(f"done in {time.perf_counter() - t0:.0f} s: {args.steps} timed steps per variant after "
          f"{args.warmup} untimed, 8 prompts x 8 samples, max_new_tokens {args.max_new_tokens}\n")

    # TRL's per-step cost includes its loop between steps (logging every 10, fetching the batch).
    n = min(len(rec["TRL GRPOTrainer"]), len(trl_gap))
    step_only = rec["TRL GRPOTrainer"]
    rec["TRL GRPOTrainer"] = [s + g for s, g in zip(step_only[:n], trl_gap[:n])]
    rec["TRL, step only (no loop)"] = step_only
    lens = {"TRL GRPOTrainer": trl_len, "TRL, step only (no loop)": trl_len,
            "floor (hand-written)": floor.lengths, **lengths}
    t_trl, t_floor = median(rec["TRL GRPOTrainer"]), median(rec["floor (hand-written)"])
    mean = lambda ts: sum(ts) / len(ts)  # noqa: E731
    a_trl = mean(rec["TRL GRPOTrainer"])
    rows = []
    for name, ts in rec.items():
        m = median(ts)
        ln = lens.get(name) or []
        rows.append([name, f"{m * 1e3:.1f} ({spread([t * 1e3 for t in ts])})", f"{1 / m:.2f}",
                     f"**{t_trl / m:.2f}**", f"{t_floor / m:.2f}", f"{mean(ts) * 1e3:.1f}",
                     f"**{a_trl / mean(ts):.2f}**", f"{sum(ln) / len(ln):.2f}" if ln else "-"])
    table(["variant", "ms/step median (min..max)", "steps/s", "steps/s vs TRL", "steps/s vs floor",
           "ms/step mean", "mean steps/s vs TRL (whole run)", "mean completion tokens"], rows)
    print(f"\naccounting_every (default) = {resolve().accounting_every}, accounting_unit = "
          f"{resolve().accounting_unit}")


if __name__ == "__main__":
    main()
