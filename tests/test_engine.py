"""The GRPO engine on the tiny model: a short real run, its run directory, repeatability."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_sets
from entclip.contracts.config import resolve
from mixed_groups import mixed_groups
from entclip.training.engine import Trainer
from entclip.training.loop import train
from entclip.contracts.rundir import RunDir, load_run

EXPECTED_KEYS = {
    "step", "reward/mean", "reward/std", "reward/accuracy", "reward/zero_var_frac", "entropy/mean",
    "disc/mean", "disc/std", "disc/baseline_mean", "disc/dev_mean", "disc/dev_std", "disc/min_z_b",
    "disc/min_z_v", "clip/ratio_low_frac", "clip/ratio_high_frac", "clip/filter_frac",
    "clip/filter_frac_pos", "clip/filter_frac_neg", "loss/total", "loss/policy", "kl/ref", "grad/norm",
    "length/mean", "perf/step_s", "perf/tokens_per_s", "lr", "train/updates",
}


def _run(tmp_path, name, wrap_sampler=None, **overrides):
    cfg = resolve(sets=tiny_sets(**overrides))
    run = RunDir.create(tmp_path / name)
    run.write_config(cfg.to_yaml())
    summary = train(cfg, run, log=lambda s: None, wrap_sampler=wrap_sampler)
    return cfg, load_run(run.path), summary


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """Every group mixed (mixed_groups): nonzero advantages, so a nonzero gradient that changes the
    weights, and wrong tokens below the batch's centre, whatever the model samples."""
    return _run(tmp_path_factory.mktemp("runs"), "plain", wrap_sampler=mixed_groups)


def test_two_steps_write_a_complete_run_directory(plain_run):
    cfg, run, summary = plain_run
    assert [r["step"] for r in run.metrics] == [1, 2]
    for row in run.metrics:
        assert EXPECTED_KEYS <= row.keys(), EXPECTED_KEYS - row.keys()
        assert math.isfinite(row["loss/total"]) and row["grad/norm"] > 0
        assert row["train/updates"] == cfg.epochs * cfg.minibatches
    assert [e["step"] for e in run.evals] == [0, 1, 2]
    assert {"test/greedy_acc", "test/avg@4", "test/pass@1", "test/pass@4"} <= run.evals[0].keys()
    samples = [json.loads(line) for line in (run.path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * cfg.samples_per_step
    assert {"prompt", "completion", "reward", "advantage"} <= samples[0].keys()
    assert summary["status"] == "completed" and run.summary["format"] == 1


def test_a_wrapped_sampler_draws_the_runs_rollouts(plain_run):
    """Trainer(wrap_sampler=...) routes every rollout through the wrapper: each group is mixed and
    the logged samples (rows 0 and 1 of the first group) are the rows mixed_groups built."""
    _, run, _ = plain_run
    assert all(r["reward/zero_var_frac"] == 0 for r in run.metrics)
    samples = [json.loads(line) for line in (run.path / "samples.jsonl").read_text().splitlines()]
    assert [(s["reward"], s["completion"] == "+=+") for s in samples[:2]] == [(1.0, False), (0.0, True)]
    assert samples[0]["advantage"] > 0 > samples[1]["advantage"]


def test_checkpoint_loads_with_auto_classes_and_differs_from_the_warm_start(plain_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run, summary = plain_run
    ckpt = run.path / summary["checkpoint"]
    assert (ckpt / "model.safetensors").exists() and (ckpt / "trainer_state.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(summary["warm_start"]["path"])
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), start.named_parameters())
               if not torch.equal(p, q)]
    assert changed, "GRPO updates did not change any parameter"
    assert tok.decode(tok("12+34=")["input_ids"], skip_special_tokens=True) == "12+34="
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and "optimizer" in state


def test_same_seed_repeats_exactly_on_cpu(plain_run, tmp_path):
    _, first, _ = plain_run
    _, second, _ = _run(tmp_path, "again", wrap_sampler=mixed_groups)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    assert strip(first.metrics) == strip(second.metrics)
    assert first.evals == second.evals


def test_single_update_per_batch_is_on_policy(tmp_path):
    """With one update the recomputed log-probs equal the old ones: ratio 1, nothing ratio-clipped."""
    _, run, _ = _run(tmp_path, "onpolicy", minibatches=1, eps_low=0.0, eps_high=0.0)
    for row in run.metrics:
        assert row["clip/ratio_low_frac"] == 0 and row["clip/ratio_high_frac"] == 0


@pytest.mark.parametrize("method, sets", [
    ("clip_b", {"clip_b_mu": 0.3}),
    ("clip_v", {"clip_v_mu": 0.3, "clip_v_max_frac": "null"}),
    ("clip_b", {"clip_b_mu": 0.3, "filter_rule": "paper"}),
])
def test_filters_with_a_small_mu_drop_tokens_and_log_it(tmp_path, method, sets):
    """Mixed groups: row 1 of each group (A < 0) starts with "+" right after "=", p ~ 0, so S* ~ 0,
    below the batch's S* centre (z_b -0.54 to -0.91, and some wrong token at z_v < -2, over
    ENTCLIP_TEST_SEED 0-11) where mu = 0.3 drops it. The paper rule (two-sided, |z| > mu dropped) with
    mu < 1 drops a token whenever S* is not constant: mean z^2 = 1, so not every |z| <= 0.3."""
    _, run, _ = _run(tmp_path, method, wrap_sampler=mixed_groups, entropy_control=method, **sets)
    assert any(r["clip/filter_frac"] > 0 for r in run.metrics)
    if sets.get("filter_rule") != "paper":  # released rule: only negative advantages are dropped
        assert all(r["clip/filter_frac_pos"] == 0 for r in run.metrics)


def test_logged_min_z_are_the_batch_minima_of_clip_b_and_clip_v_z(tmp_path):
    """disc/min_z_b = min over valid tokens of (S* - mean S*) / std S*; disc/min_z_v = min of
    x / std x, x = S* - E_p[S], not centred (THEORY.md): recomputed in float64 from the step's batch.
    Mixed groups put the wrong rows' deviations below 0, so mean x / std x is far from 0 and a
    centred z_v would not match."""
    cfg = resolve(sets=tiny_sets())
    trainer = Trainer(cfg, RunDir.create(tmp_path / "t"), lambda s: None, wrap_sampler=mixed_groups)
    roll, stats = _stats_of_step(trainer, 1)[:2]
    valid = roll.completion_mask.bool()
    s = stats.disc[valid].double()
    x = (stats.disc - stats.baseline)[valid].double()
    assert abs(float(x.mean() / x.std(correction=0))) > 0.05
    metrics = trainer.step(1)  # the same step on the same weights: it redraws this batch from (seed, step)
    assert metrics["disc/min_z_b"] == pytest.approx(float(((s - s.mean()) / s.std(correction=0)).min()), rel=1e-5)
    assert metrics["disc/min_z_v"] == pytest.approx(float((x / x.std(correction=0)).min()), rel=1e-5)


@pytest.mark.parametrize("overrides", [
    {"loss_agg": "seq-mean-token-mean"},
    {"loss_agg": "constant", "scale_std": "false"},
    {"kl_coef": 0.1, "lr_schedule": "cosine", "epochs": 2},
])
def test_objective_variants_train(tmp_path, overrides):
    """With a KL term: mixed groups give the first update a nonzero gradient, so every later update
    sees a policy that left the reference (the warm start) and kl/ref > 0 each step; a reference that
    followed the policy, or a KL never computed, would log 0."""
    _, run, _ = _run(tmp_path, "variant", wrap_sampler=mixed_groups, **overrides)
    assert all(math.isfinite(r["loss/total"]) for r in run.metrics)
    if "kl_coef" in overrides:
        assert all(r["kl/ref"] > 0 for r in run.metrics)
        assert run.metrics[-1]["train/updates"] == 4


def test_filter_statistics_are_taken_over_the_whole_batch(tmp_path):
    """The keep-mask is computed once per rollout batch, before the first update, on every row.
    Mixed groups make the filter drop tokens (see the small-mu test), so the comparison has teeth."""
    from entclip.training.objective import batch_filter
    from entclip.core import losses

    cfg = resolve(sets=tiny_sets(entropy_control="clip_b", clip_b_mu=0.3))
    trainer = Trainer(cfg, RunDir.create(tmp_path / "t"), lambda s: None, wrap_sampler=mixed_groups)
    roll, stats, rewards = _stats_of_step(trainer, 1)
    adv = losses.group_advantages(rewards, cfg.group_size)[:, None].expand_as(roll.completion_mask)
    keep, out = batch_filter(cfg, trainer.session.accelerator, stats, adv, roll.completion_mask, torch.Generator())
    expected = losses.clip_b_mask(stats.disc, adv, roll.completion_mask, mu=0.3)
    assert torch.equal(keep, expected)
    assert not (keep & ~roll.completion_mask.bool()).any()
    assert (~keep & roll.completion_mask.bool()).any()


@pytest.mark.parametrize("overrides, key, positive", [
    ({"entropy_control": "high_entropy", "high_entropy_rho": 0.2}, "clip/filter_frac", True),
    ({"entropy_control": "clip_cov", "cov_frac": 0.1, "cov_lb": -100, "cov_ub": 100}, "clip/filter_frac", True),
    ({"entropy_control": "kl_cov", "kl_cov_frac": 0.1}, "clip/kl_cov_frac", True),
    ({"entropy_control": "steer"}, "clip/steer_w_min", True),
    ({"dual_clip_c": 1.5, "epochs": 3}, "clip/dual_frac", None),
    ({"eps_high": 0.28}, "clip/ratio_high_frac", None),
    ({"entropy_coef": 0.01}, "entropy/bonus_coef", True),
    ({"entropy_target": 5.0, "entropy_coef_delta": 0.01}, "entropy/bonus_coef", True),
    ({"entropy_control": "clip_b", "filter_target_share": 0.1}, "clip/mu", None),
    ({"entropy_control": "clip_v", "filter_target_dh": 0.0}, "clip/mu", None),
])
def test_every_method_trains_and_logs_its_share(tmp_path, overrides, key, positive):
    """What makes each share positive holds on any batch with mixed groups (mixed_groups):
    high_entropy drops the 80% of tokens below the top-20% entropy (distinct H values);
    clip_cov's band (-100, 100) holds every token (|A| <= 2, |log p| < 20), so 10% of them drop;
    kl_cov selects max(1, 10%) tokens; STEER's weights lie in [w_min, w_max] = [0.8, 1.2];
    the entropy target 5 is above log V = log 16 = 2.77, the most a 16-token model can reach, so the
    coefficient grows every step; the adaptive share needs tokens with A < 0 below the centre: the
    mixed rows' wrong tokens, a quarter of the step's tokens."""
    _, run, _ = _run(tmp_path, "method", wrap_sampler=mixed_groups, **overrides)
    for row in run.metrics:
        assert key in row and math.isfinite(row[key]) and math.isfinite(row["loss/total"])
    if positive:
        assert any(r[key] > 0 for r in run.metrics)
    if "filter_target_share" in overrides:  # the adaptive mu drops about the target share
        assert all(abs(r["clip/filter_frac"] - 0.1) < 0.05 for r in run.metrics)
    if overrides.get("entropy_target"):  # entropy far below target: the coefficient grows each update (2 a step)
        assert [r["entropy/bonus_coef"] for r in run.metrics] == pytest.approx([0.02, 0.04])


@pytest.mark.parametrize("overrides", [
    {"micro_batch_size": 3},  # 8 rows per update in micro-batches of 3, 3 and 2
    {"gradient_checkpointing": True},
    {"generation_batch_size": 5},  # sampling in pieces draws the same tokens
])
def test_memory_savers_do_not_change_the_run(plain_run, tmp_path, overrides):
    """Micro-batching (gradient accumulation over the minibatch's global normalizer), activation
    checkpointing and split generation change memory, not the updates: the figures match."""
    _, base, _ = plain_run
    _, run, _ = _run(tmp_path, "saver", wrap_sampler=mixed_groups, **overrides)
    assert len(run.metrics) == len(base.metrics)
    for a, b in zip(base.metrics, run.metrics):
        for k in a:
            if not k.startswith("perf/"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert run.evals == base.evals


def test_accounting_without_room_for_the_old_logits_reports_the_rest(tmp_path, monkeypatch):
    """Above ACCOUNT_LOGITS_MAX (large batches x vocabularies) pred_dz is left out, nothing else."""
    import entclip.training.passes as passes

    monkeypatch.setattr(passes, "ACCOUNT_LOGITS_MAX", 0)
    _, run, _ = _run(tmp_path, "nologits")
    for row in run.metrics:
        assert "entropy/pred_dz" not in row
        assert {"entropy/pred_param", "entropy/pred_logit", "entropy/measured"} <= row.keys()


def test_micro_batches_with_a_filter_log_the_same_fractions(tmp_path):
    """Token fractions are shares of the valid tokens, however the minibatch is split (a rollout-scope
    filter: at micro scope the 80/20 quantile is per micro-batch, as TRL's). Mixed groups give the first
    update a nonzero gradient, which moves the second minibatch's ratios."""
    kw = dict(wrap_sampler=mixed_groups, entropy_control="high_entropy", filter_scope="rollout",
              eps_high=0.05, eps_low=0.05)
    _, whole, _ = _run(tmp_path, "whole", **kw)
    _, parts, _ = _run(tmp_path, "parts", micro_batch_size=3, **kw)
    assert any(r["clip/ratio_low_frac"] + r["clip/ratio_high_frac"] > 0 for r in whole.metrics)
    for a, b in zip(whole.metrics, parts.metrics):
        for k in ("clip/ratio_low_frac", "clip/ratio_high_frac", "loss/total", "clip/filter_frac"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_a_failing_reward_is_counted_every_step_and_shown_once(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_reward.py").write_text("def f(completion, answer, prompt):\n    return 1 / 0\n")
    cfg = resolve(sets=tiny_sets(reward="exact,broken_reward:f=0.5", reward_timeout=0))
    run = RunDir.create(tmp_path / "broken")
    run.write_config(cfg.to_yaml())
    lines: list[str] = []
    train(cfg, run, log=lines.append)
    shown = [line for line in lines if "reward call failed" in line]
    assert len(shown) == 1 and "broken_reward:f: ZeroDivisionError" in shown[0]
    rows = load_run(run.path).metrics
    assert all(r["reward/errors"] == cfg.batch_size for r in rows)  # every completion, every step


def _stats_of_step(trainer, step: int):
    """The step's own batch (collect, score) and its statistics pass, as train_step takes them."""
    from entclip.training.batch import minibatch_plan
    from entclip.training.engine import collect, score
    from entclip.training.passes import statistics

    batch = score(trainer.session, collect(trainer.session, step))
    plan = minibatch_plan(trainer.cfg, step, batch.rollout.completion_ids.shape[0], "cpu")
    stats = statistics(trainer.session, trainer.learner, batch, [m for mb in plan[0] for m in mb])[0]
    return batch.rollout, stats, batch.rewards
