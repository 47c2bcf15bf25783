"""`entclip predict-entropy`: what one GRPO step would do to entropy, token by token, and what it did.

One step here is one optimizer update on the whole sampled batch (on-policy, ratio 1), with the
configured aggregation, token filter, optimizer and learning rate. Per-token predictions are Theorem
3.3's first-order contributions to the change of Hbar (mean token entropy over the batch's valid
response tokens), so the records add up to the reported total. `--apply` takes the step and measures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from entclip.core import theory
from entclip.training.accounting import loss_weights, quadrants
from entclip.contracts.config import Config
from entclip.contracts.errors import BAD_DATA, NOT_FOUND, EntclipError
from entclip.data.models import is_adapter
from entclip.data.tasks.arithmetic import Problem


@dataclass
class Prediction:
    records: list[dict[str, Any]]      # one per valid response token
    totals: dict[str, float]           # pred_logit, drive, quadrants, counts
    applied: dict[str, float] | None   # measured vs predicted after --apply


def resolve_model(arg: str | None) -> str | None:
    """None -> the built-in model; a run directory -> its latest checkpoint; else the folder or id."""
    if arg is None:
        return None
    path = Path(arg).expanduser()
    if arg.startswith(("/", "./", "../", "~")) and not path.exists():
        raise EntclipError(f"model path {arg} does not exist; give a run directory, a checkpoint or model folder", NOT_FOUND)
    if (path / "config.yaml").exists() and not (path / "config.json").exists():
        from entclip.contracts.rundir import latest_checkpoint

        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise EntclipError(f"run directory {path} has no checkpoint yet; give a finished run", NOT_FOUND)
        return str(ckpt)
    if path.exists() and not (path / "config.json").exists() and not is_adapter(path):
        raise EntclipError(f"{path} is neither a run directory nor a model folder (no config.json)", NOT_FOUND)
    return arg


def load_problems(source: str, train: list[Problem], n: int, seed: int, prompt_field: str = "prompt",
                  answer_field: str = "answer", split: str = "train") -> list[Problem]:
    """The first n problems of a source, each with the reference answer its reward needs.

    'builtin': n problems drawn from the task's train split. A .tsv file: prompt<TAB>answer lines.
    A .jsonl/.json/.csv/.parquet file or a Hugging Face dataset id: read by entclip.data.tasks.dataset,
    with `prompt_field` / `answer_field` columns (dots reach nested fields; a list of chat messages
    becomes its contents joined by blank lines); rows with an empty problem or answer are skipped.
    """
    if source == "builtin":
        return random.Random(seed).sample(train, min(n, len(train)))
    path = Path(source)
    if path.suffix == ".tsv":
        if not path.is_file():
            raise EntclipError(f"prompts file {path} not found; give 'builtin' or an existing file", NOT_FOUND)
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            prompt, sep, answer = line.partition("\t")
            if line.strip() and not sep:
                raise EntclipError(f"{path} line {i}: expected 'prompt<TAB>answer'", BAD_DATA)
            if line.strip():
                rows.append(Problem(prompt, answer))
    else:
        from entclip.data.tasks.dataset import problems_from_rows

        rows, _ = problems_from_rows(_dataset_rows(source, prompt_field, answer_field, split), source,
                                     prompt_field, answer_field, fix=FIELD_FIX)
    if not rows:
        raise EntclipError(f"{source} holds no prompts; give a non-empty file or 'builtin'", BAD_DATA)
    return rows[:n]


FIELD_FIX = "pass --prompt-field / --answer-field"


def _dataset_rows(source: str, prompt_field: str, answer_field: str, split: str):
    """The split's rows (through entclip.data.tasks.dataset), checked to have both columns."""
    from entclip.data.tasks.dataset import check_fields, read_rows

    ds = read_rows(source, split, local_fix="--prompts FILE")
    check_fields(ds, source, (prompt_field, answer_field), FIELD_FIX)
    return ds


def predict(cfg: Config, model_path: str | None, problems: list[Problem], apply: bool,
            log=lambda s: None, wrap_sampler=None) -> Prediction:
    """One GRPO update's predicted entropy change on G samples of each problem (and, with `apply`,
    the update taken and measured). `wrap_sampler`: as in Trainer (the sampler the batch comes from).

    The training step's own stages: sample and score (engine), statistics (passes), the filter
    (objective), and with `apply` the update (update) and its accounting (engine.account_step)."""
    from entclip.training.batch import Batch, Prepared, derive_seed, minibatch_plan
    from entclip.training.engine import account_step, sample_problems, score
    from entclip.training.objective import batch_filter, loss_masks
    from entclip.training.passes import statistics
    from entclip.training.session import TrainState, open_learner, open_session
    from entclip.training.update import Timings, update

    if len(problems) != cfg.prompts_per_step or cfg.minibatches != 1 or cfg.epochs != 1 or cfg.scope != "rollout":
        raise ValueError("predict: one update on the whole batch needs prompts_per_step == len(problems), "
                         "minibatches == epochs == 1 and filter_scope=rollout")
    session = open_session(cfg, None, log, model_path=model_path, wrap_sampler=wrap_sampler)
    learner = open_learner(session, model_path) if apply else None
    try:
        torch.manual_seed(derive_seed(cfg.seed, "predict"))
        roll = sample_problems(session, problems)
        batch = score(session, Batch(0, roll, [(i, j) for i in range(len(problems)) for j in range(cfg.group_size)]),
                      answers=[p.answer for p in problems for _ in range(cfg.group_size)])
        mask, adv_tok = batch.mask, batch.adv_tok  # (B, T)
        plan = minibatch_plan(cfg, 0, roll.completion_ids.shape[0], roll.completion_ids.device)
        stats, account, first = statistics(session, learner, batch, [m for mb in plan[0] for m in mb], account=apply)
        keep, filt = batch_filter(cfg, session.accelerator, stats, adv_tok, mask,
                                  torch.Generator().manual_seed(derive_seed(cfg.seed, "filter", 0)))
        loss_mask = mask * keep
        n_valid = max(int(mask.sum()), 1)
        norm = loss_masks(cfg, mask, keep)[0]
        weights = loss_weights(norm, cfg.loss_agg, cfg.agg_constant)  # one update on the batch
        unit = theory.grpo_logit_delta(stats.disc, stats.baseline, adv_tok, 1.0, 1.0, cfg.temperature)
        drive = unit * weights * loss_mask / n_valid  # (B, T) without the learning rate
        contrib = cfg.lr * drive
        records = _records(session.tokenizer, roll, stats, adv_tok, keep, contrib, cfg.group_size)
        valid = mask.bool()
        totals: dict[str, float] = {
            "tokens": n_valid, "sequences": int(mask.shape[0]), "reward/mean": float(batch.rewards.mean()),
            "entropy/mean": float(stats.entropy[valid].mean()), "lr": cfg.lr,
            "entropy/pred_logit": float(contrib.sum()), "entropy/pred_logit_drive": float(drive.sum()),
            "disc/mean": float(stats.disc[valid].mean()),
            "disc/dev_mean": float((stats.disc - stats.baseline)[valid].mean()), **filt}
        for name, (share, pred) in quadrants(stats.disc - stats.baseline, adv_tok, mask, contrib).items():
            totals[f"quad/{name}_share"], totals[f"quad/{name}_pred"] = share, pred
        applied = None
        if apply:
            timings = Timings()
            update(session, learner, TrainState(entropy_coef=cfg.entropy_coef),
                   Prepared(batch, stats, keep, plan, account, first), timings)
            applied = account_step(session, batch, stats, account, timings)
    finally:
        session.rewards.close()
        session.sampler.close()
    return Prediction(records, totals, applied)


def _records(tokenizer, roll, stats, adv_tok, keep, contrib, group_size: int) -> list[dict[str, Any]]:
    out = []
    ids = roll.completion_ids.tolist()
    for b, t in roll.completion_mask.nonzero().tolist():
        out.append({
            "prompt_index": b // group_size, "sample": b % group_size, "position": t,
            "prompt": roll.prompts[b], "context": tokenizer.decode(ids[b][:t], skip_special_tokens=True),
            "token": tokenizer.decode([ids[b][t]]), "p": float(stats.old_logp[b, t].exp()),
            "entropy": float(stats.entropy[b, t]), "disc": float(stats.disc[b, t]),
            "baseline": float(stats.baseline[b, t]),
            "deviation": float(stats.disc[b, t] - stats.baseline[b, t]),
            "advantage": float(adv_tok[b, t]), "kept": bool(keep[b, t]), "pred": float(contrib[b, t])})
    return out


def explain_distribution(logits: torch.Tensor, temperature: float = 1.0) -> dict[str, Any]:
    """Theorem 3.2 for one distribution: per token i, dH/d(eps) if logit i were raised (rewarded).

    logits (V,). Returns H, exp(-H) (the probability above which rewarding a token lowers entropy)
    and rows sorted by p: p_i, S_i, dH/deps = -S_i / T.
    """
    logits = logits.double()
    p = torch.softmax(logits / temperature, -1)
    h = float(-(p * torch.log_softmax(logits / temperature, -1)).sum())
    ks = torch.arange(logits.shape[-1])
    delta = theory.single_logit_delta(logits.expand(len(ks), -1), ks, temperature)  # (V,)
    order = torch.argsort(p, descending=True).tolist()
    rows = [{"index": i, "p": float(p[i]), "disc": float(-delta[i] * temperature), "dH_if_rewarded": float(delta[i]),
             "dH_if_penalized": float(-delta[i])} for i in order]
    return {"entropy": h, "threshold_p": float(torch.exp(torch.tensor(-h))), "rows": rows}
