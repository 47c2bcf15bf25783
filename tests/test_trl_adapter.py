"""entclip's token filters inside TRL's GRPOTrainer (entclip/training/trl_adapter.py, the `trl` extra).

On the tiny warm-started model, offline, one TRL step each: the adapter's keep-mask is the own
engine's decision (its statistics pass and `objective.batch_filter`) on the same completions, TRL's
logged loss is the loss of the kept tokens, and what the TRL path cannot do is refused by name.
Skipped without trl.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

pytest.importorskip("trl")

from conftest import TEST_SEED, tiny_sets  # noqa: E402
from mixed_groups import mixed_rewards  # noqa: E402
from entclip.contracts.config import resolve  # noqa: E402
from entclip.contracts.errors import EntclipError  # noqa: E402
from entclip.training import objective, passes  # noqa: E402
from entclip.training.batch import Batch, derive_seed  # noqa: E402
from entclip.training.rollout import Rollout  # noqa: E402

PROMPTS, G, T_MAX = 8, 4, 6  # 32 completions of at most 6 tokens per step
# Thresholds small enough to drop tokens (the released defaults drop almost none on 32 rows).
CLIP_B = ["entropy_control=clip_b", "clip_b_mu=0.3"]
CLIP_V = ["entropy_control=clip_v", "clip_v_mu=0.3", "clip_v_max_frac=null"]


@pytest.fixture(scope="module")
def tiny():
    """The tiny model's warm-start folder (entclip's cache), its task's prompts and TRL's reward."""
    from datasets import Dataset

    from entclip.data.models import load_policy
    from entclip.data.tasks.arithmetic import ArithmeticTask

    cfg = resolve(sets=tiny_sets())
    _, _, ws = load_policy(cfg, log=lambda s: None)
    task = ArithmeticTask(max_operand=cfg.max_operand, n_test=cfg.n_test)
    ds = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in task.train])

    # Rewards that differ in every group whatever the tiny model sampled on this CPU: the filters have
    # negative-advantage tokens to drop on any machine (tests/mixed_groups.py).
    return types.SimpleNamespace(path=ws["path"], ds=ds, reward=mixed_rewards(G))


def grpo_args(tmp_path, **over):
    from trl import GRPOConfig

    kw = dict(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, fp16=False, report_to="none",
              disable_tqdm=True, save_strategy="no", logging_steps=1, seed=TEST_SEED, max_steps=1,
              dataloader_num_workers=0, per_device_train_batch_size=PROMPTS * G, num_generations=G,
              max_completion_length=T_MAX, temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
              learning_rate=1e-4, lr_scheduler_type="constant")
    return GRPOConfig(**{**kw, **over})


def train_one_step(tiny, tmp_path, sets, **over):
    """One TRL step of EntclipGRPOTrainer with the tiny config plus `sets`; returns the trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from entclip.training.trl_adapter import EntclipGRPOTrainer

    cfg = resolve(sets=tiny_sets() + sets)
    trainer = EntclipGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny.path), reward_funcs=tiny.reward,
                                 args=grpo_args(tmp_path, **over), train_dataset=tiny.ds,
                                 processing_class=AutoTokenizer.from_pretrained(tiny.path), config=cfg)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


# TRL layouts: one update per generation batch (TRL runs no old-log-prob forward: the adapter runs the
# statistics pass), and two (num_iterations 2, or two micro-batch steps per generation): TRL's
# old-log-prob forward is the statistics pass. max_steps 2: one generation batch, two updates.
ONE_UPDATE = {}
TWO_ITERATIONS = dict(num_iterations=2, max_steps=2)
TWO_STEPS = dict(steps_per_generation=2, per_device_train_batch_size=PROMPTS * G // 2, max_steps=2)
LAYOUTS = pytest.mark.parametrize("layout", [ONE_UPDATE, TWO_ITERATIONS, TWO_STEPS],
                                  ids=["one-update", "two-iterations", "two-steps"])


@LAYOUTS
@pytest.mark.parametrize("sets", [CLIP_B, CLIP_V], ids=["clip_b", "clip_v"])
def test_keep_mask_is_the_own_engines_decision(tiny, tmp_path, sets, layout):
    """Same completions: the own engine's statistics pass (passes.statistics on the policy before the
    update, in other micro-batches) and objective.batch_filter drop exactly the adapter's tokens,
    whether the adapter ran its own statistics pass or shared TRL's old-log-prob forward."""
    from transformers import AutoModelForCausalLM

    trainer = train_one_step(tiny, tmp_path, sets, **layout)
    assert trainer.state.log_history[0]["perf/stats_shared"] == float(layout is not ONE_UPDATE)
    fb, cfg = trainer.last_filtered, trainer.entclip_config
    B, T = fb.completion_ids.shape
    P = fb.input_ids.shape[1] - T
    roll = Rollout(prompt_ids=fb.input_ids[:, :P], prompt_mask=fb.attention_mask[:, :P],
                   completion_ids=fb.completion_ids, completion_mask=fb.mask, prompts=[""] * B,
                   completions=[""] * B)
    batch = Batch(step=0, rollout=roll, row_ids=[(i, 0) for i in range(B)]).with_scores(
        torch.zeros(B), [False] * B, {}, fb.advantages)
    session = types.SimpleNamespace(cfg=cfg, accelerator=trainer.accelerator, autocast=contextlib.nullcontext,
                                    model=AutoModelForCausalLM.from_pretrained(tiny.path))  # before the update
    stats, _, _ = passes.statistics(session, None, batch, list(torch.arange(B).split(5)))
    keep, figures = objective.batch_filter(cfg, trainer.accelerator, stats, batch.adv_tok, batch.mask,
                                           torch.Generator().manual_seed(derive_seed(cfg.seed, "filter", 0)))
    valid = fb.mask.bool()
    for name in ("disc", "baseline", "entropy", "old_logp"):
        torch.testing.assert_close(getattr(fb.stats, name)[valid], getattr(stats, name)[valid], atol=1e-5, rtol=1e-4)
    assert torch.equal(keep.bool() & valid, fb.keep)
    dropped = 1 - float(fb.keep.sum()) / float(valid.sum())
    assert dropped > 0.02, f"the filter dropped {dropped:.3f} of the tokens: the test has no teeth"
    logged = trainer.state.log_history[0]
    assert logged["clip/filter_frac"] == pytest.approx(dropped, abs=1e-6)
    for name in ("disc/min_z_b", "disc/min_z_v", "clip/filter_frac_pos", "clip/filter_frac_neg", "clip/mu"):
        assert logged[name] == pytest.approx(figures[name], abs=1e-6), name


@pytest.mark.parametrize("loss_type,layout", [("dapo", ONE_UPDATE), ("bnpo", ONE_UPDATE), ("dr_grpo", ONE_UPDATE),
                                              ("grpo", ONE_UPDATE), ("dapo", TWO_ITERATIONS)],
                         ids=["dapo", "bnpo", "dr_grpo", "grpo", "dapo-two-iterations"])  # dapo: TRL 1.16's default
def test_trl_loss_is_the_kept_tokens_loss(tiny, tmp_path, loss_type, layout):
    """The first update of a batch: the ratio is 1, so each token's loss is -A; TRL's logged loss is
    their aggregate over the kept tokens only (dapo: num_items_in_batch recounted), not over all
    tokens, and TRL's logged entropy is the kept tokens' mean. (grpo averages each sequence's tokens
    first, so at ratio 1 a partly dropped sequence keeps its loss -A: its teeth are the entropy.) With
    two iterations TRL's old log-probs are the statistics pass's log p: the ratio is 1 only if they
    are the log-probs of TRL's own training forward."""
    trainer = train_one_step(tiny, tmp_path, CLIP_B, loss_type=loss_type, **layout)
    assert trainer.loss_type == loss_type
    fb = trainer.last_filtered
    A = fb.advantages.float()[:, None]

    def loss(m):
        m = m.float()
        if loss_type == "dapo" or loss_type == "bnpo":
            return float(-(A * m).sum() / m.sum().clamp(min=1))
        if loss_type == "dr_grpo":
            return float(-(A * m).sum() / (m.shape[0] * T_MAX))
        return float((-(A * m).sum(-1) / m.sum(-1).clamp(min=1)).mean())

    def entropy(m):
        return float((fb.stats.entropy * m).sum() / m.sum())

    logged = trainer.state.log_history[0]
    kept, every = loss(fb.keep), loss(fb.mask)
    assert logged["loss"] == pytest.approx(kept, rel=1e-5, abs=1e-7)
    assert logged["entropy"] == pytest.approx(entropy(fb.keep), rel=1e-4)
    assert abs(entropy(fb.keep) - entropy(fb.mask)) > 1e-3, "the dropped tokens do not move the entropy"
    if loss_type != "grpo":
        assert abs(kept - every) > 1e-4, "the dropped tokens do not move the loss: the test has no teeth"


@pytest.mark.parametrize("sets", [
    ["entropy_control=sign", "sign_statistic=deviation", "sign_deviation=neg"],
    ["entropy_control=clip_b", "filter_target_share=0.1"],
    ["entropy_control=clip_v", "filter_target_share=0.1"],
    ["entropy_control=high_entropy", "filter_scope=rollout"],
    ["entropy_control=clip_cov", "filter_scope=rollout", "cov_frac=0.05", "cov_lb=-10", "cov_ub=10"],
], ids=["sign", "clip_b-adaptive", "clip_v-adaptive", "high_entropy-rollout", "clip_cov-rollout"])
def test_other_rollout_masks_reach_trls_loss(tiny, tmp_path, sets):
    """The other rollout-scope masks: batch_filter's decision on the adapter's statistics reaches TRL's
    dapo loss; kept normalizer (sign, Clip_B/V): over the kept tokens; all (80/20, Clip-Cov): dropped
    tokens lose their policy term (advantage 0) but the normalizer keeps every valid token."""
    trainer = train_one_step(tiny, tmp_path, sets)
    fb, cfg = trainer.last_filtered, trainer.entclip_config
    keep, figures = objective.batch_filter(cfg, trainer.accelerator, fb.stats, fb.advantages[:, None].expand_as(
        fb.mask).float(), fb.mask, torch.Generator().manual_seed(derive_seed(cfg.seed, "filter", 0)))
    assert torch.equal(keep.bool() & fb.mask.bool(), fb.keep)
    assert 0 < fb.keep.sum() < fb.mask.sum(), "nothing or everything dropped: the test has no teeth"
    A, k, m = fb.advantages.float()[:, None], fb.keep.float(), fb.mask.float()
    expected = -(A * k).sum() / (k.sum() if cfg.normalizer == "kept" else m.sum())
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    if cfg.filter_target_share is not None:
        assert logged["clip/mu"] == pytest.approx(figures["clip/mu"])


@pytest.mark.parametrize("sets,over,key", [
    (["entropy_control=kl_cov"], {}, "entropy_control=kl_cov"),
    (["entropy_control=steer"], {}, "entropy_control=steer"),
    (["entropy_control=high_entropy"], {}, "filter_scope=micro"),
    (CLIP_B, {"loss_type": "vespo"}, "loss_type=vespo"),
    (CLIP_B, {"importance_sampling_level": "sequence"}, "importance_sampling_level=sequence"),
    (CLIP_B, {"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
    (CLIP_B + ["dual_clip_c=3.0"], {}, "dual_clip_c"),
    (CLIP_B + ["temperature=0.7"], {}, "temperature"),
], ids=["kl_cov", "steer", "micro", "vespo", "sequence", "trl-80/20", "dual_clip", "temperature"])
def test_unsupported_settings_are_refused_by_name(tmp_path, sets, over, key):
    from entclip.training.trl_adapter import EntclipGRPOTrainer

    cfg = resolve(sets=tiny_sets() + sets)
    with pytest.raises(EntclipError) as err:
        EntclipGRPOTrainer(model="never-loaded", reward_funcs=[], args=grpo_args(tmp_path, **over), config=cfg)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_templated_prompts_are_tokenized_as_the_own_engine_feeds_them(tiny, tmp_path):
    """A dataset prompt that carries its chat template (add_special_tokens False) gets no BOS from TRL's
    tokenization; otherwise TRL's own (the tokenizer's special tokens, as the built-in task's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entclip.training.trl_adapter import EntclipGRPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny.path)
    prompts = ["12+7=", "3+4="]
    with_specials = tok(prompts)["input_ids"]
    without = tok(prompts, add_special_tokens=False)["input_ids"]
    assert with_specials != without, "the tokenizer adds no special token: the test has no teeth"
    for add, expected in ((True, with_specials), (False, without)):
        trainer = EntclipGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny.path), reward_funcs=tiny.reward,
                                     args=grpo_args(tmp_path), train_dataset=tiny.ds, processing_class=tok,
                                     config=resolve(sets=tiny_sets()), add_special_tokens=add)
        ids, images, extra = trainer._tokenize_prompts(prompts)
        assert [list(x) for x in ids] == expected and images is None and not extra


def no_cache_forwards(model) -> list:
    """Counts the backbone's full-sequence forwards (use_cache False: TRL's log-prob forwards and the
    adapter's statistics pass; generation's decoding steps use the cache)."""
    calls: list = []
    model.model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(1) if kw.get("use_cache") is False else None, with_kwargs=True)
    return calls


@LAYOUTS
def test_the_filter_adds_a_forward_only_where_trl_runs_none(tiny, tmp_path, layout):
    """Backbone forwards of the same TRL training, plain GRPOTrainer against EntclipGRPOTrainer with
    Clip_B: equal where TRL runs its old-log-prob forward (the statistics share it), one per micro-batch
    of each generation batch more where it does not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOTrainer

    from entclip.training.trl_adapter import EntclipGRPOTrainer

    over = {"max_steps": 2, **layout}
    counts = {}
    for cls in (GRPOTrainer, EntclipGRPOTrainer):
        model = AutoModelForCausalLM.from_pretrained(tiny.path)
        counts[cls] = no_cache_forwards(model)
        extra = {"config": resolve(sets=tiny_sets() + CLIP_B)} if cls is EntclipGRPOTrainer else {}
        trainer = cls(model=model, reward_funcs=tiny.reward, args=grpo_args(tmp_path, **over), train_dataset=tiny.ds,
                      processing_class=AutoTokenizer.from_pretrained(tiny.path), **extra)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    plain, entclip = len(counts[GRPOTrainer]), len(counts[EntclipGRPOTrainer])
    generations = 2 if layout is ONE_UPDATE else 1
    micro = PROMPTS * G // trainer.args.per_device_train_batch_size
    assert plain >= 2, "no training forward counted: the count has no teeth"
    assert entclip == plain + (generations * micro if layout is ONE_UPDATE else 0)
