"""sampler: vllm on the tiny model, with the CPU build of vLLM (bash scripts/vllm_tests.sh builds its venv
and runs this file; the main venv has no vLLM and skips it).

Claims: a run goes end to end; after step n the engine samples from the trainer's weights after step n;
the filters drop the same tokens as with HFSampler on the same completions; the rollout/trainer
mismatch is float noise in fp32 on a CPU.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from conftest import tiny_sets  # noqa: E402
from entclip.contracts.config import resolve  # noqa: E402
from entclip.contracts.rundir import load_run  # noqa: E402
from entclip.training import objective  # noqa: E402
from entclip.training.batch import Batch, derive_seed, minibatch_plan  # noqa: E402
from entclip.training.engine import Trainer, collect, train_step  # noqa: E402
from entclip.training.passes import statistics  # noqa: E402
from entclip.training.rollout import completion_logits  # noqa: E402
from entclip.training.session import open_session  # noqa: E402
from entclip.training.vllm_sampler import VLLMSampler  # noqa: E402

# T != 1, so that log-probs taken before temperature (vLLM's raw_logprobs) would show as a mismatch;
# lr 1e-2 so that one step moves the weights far beyond float noise.
SETS = dict(sampler="vllm", temperature=0.7, lr=1e-2, minibatches=1, entropy_control="clip_b", clip_b_mu=0.5)
V = 16  # the tiny model's vocabulary
FLOAT = 1e-4  # fp32 on a CPU: measured ~1e-6


# vLLM's in-process engine keeps its parallel state in globals, which an engine's teardown clears: a
# test that builds its own engine comes after every test of the shared one (pytest keeps file order).
@pytest.fixture(scope="module")
def trainer():
    t = Trainer(resolve(sets=tiny_sets(**SETS)), None, lambda s: None)
    assert isinstance(t.session.sampler, VLLMSampler)
    return t


def _signal(batch: Batch) -> Batch:
    """The batch with advantages +1 / -1 alternating in every group: a nonzero gradient whatever was sampled."""
    B = batch.rollout.completion_ids.shape[0]
    adv = torch.tensor([1.0, -1.0] * (B // 2))
    return batch.with_scores(torch.zeros(B), [False] * B, {}, adv)


def _trainer_logp(session, roll, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) the trainer's log-probs at `temperature` on a rollout's positions."""
    with torch.no_grad():
        logits = completion_logits(session.policy, roll.input_ids, roll.attention_mask, roll.completion_ids.shape[1])
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def _vllm_logp(sampler: VLLMSampler, roll) -> torch.Tensor:
    """(B, T, V) the engine's log-softmax of its logits (before temperature: vLLM's prompt log-probs are
    raw) for every token at the rollout's positions; the vocabulary of 16 is within vLLM's 20 per position."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = torch.zeros(*roll.completion_ids.shape, V)
    for b in range(roll.completion_ids.shape[0]):
        prompt = roll.prompt_ids[b][roll.prompt_mask[b].bool()].tolist()
        n = int(roll.completion_mask[b].sum())
        ids = roll.completion_ids[b, :n].tolist()
        # The completion as the prompt's continuation: prompt_logprobs score each of its positions.
        res = sampler.llm.generate([TokensPrompt(prompt_token_ids=prompt + ids)],
                                   SamplingParams(max_tokens=1, prompt_logprobs=V,
                                                  detokenize=False), use_tqdm=False)[0]
        for t, pos in enumerate(res.prompt_logprobs[len(prompt):]):
            for tok, lp in pos.items():
                out[b, t, tok] = lp.logprob
    return out


def test_after_step_n_the_engine_samples_from_the_trainers_weights_after_step_n(trainer):
    session = trainer.session
    before = collect(session, 1)
    mask = before.mask.bool()
    for step in (1, 2):
        train_step(session, trainer.learner, trainer.state, step, batch=_signal(collect(session, step)))
        after = _trainer_logp(session, before.rollout)
        engine = _vllm_logp(session.sampler, before.rollout)
        assert (engine - after)[mask].abs().max() < FLOAT  # the logits, up to float noise
        # And what it samples: each drawn token's log-prob at T is the trainer's.
        fresh = collect(session, 100 + step).rollout
        at_t = _trainer_logp(session, fresh, SETS["temperature"]).gather(-1, fresh.completion_ids[..., None])[..., 0]
        assert (at_t - fresh.logp)[fresh.completion_mask.bool()].abs().max() < FLOAT
    start = open_session(resolve(sets=tiny_sets(**{**SETS, "sampler": "hf"})), None, lambda s: None,
                         for_training=False)
    moved = (_trainer_logp(start, before.rollout) - after)[mask].abs().max()
    assert moved > 100 * FLOAT  # the steps did move the weights: the check above has power


def test_the_same_seeds_draw_the_same_completions(trainer):
    sampler = trainer.session.sampler
    prompts, seeds = ["3+4=", "12+7="], list(range(11, 27))
    a = sampler.sample(prompts, 8, 1.0, 6, seeds=seeds)
    b = sampler.sample(prompts, 8, 1.0, 6, seeds=seeds)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logp, b.logp)
    c = sampler.sample(prompts, 8, 1.0, 6, seeds=[s + 100 for s in seeds])
    assert not torch.equal(a.completion_ids, c.completion_ids)  # the seeds, not a fixed draw, decide


def test_the_filters_drop_the_same_tokens_as_with_hf_on_the_same_completions():
    """Statistics and filter from the vLLM session's rollout (its log-probs attached) and from an
    HFSampler session on the same tokens without them, the same weights: identical."""
    cfg = resolve(sets=tiny_sets(**SETS))
    vllm_session = open_session(cfg, None, lambda s: None)
    hf_session = open_session(resolve(sets=tiny_sets(**{**SETS, "sampler": "hf"})), None, lambda s: None)
    batch = _signal(collect(vllm_session, 7))
    assert batch.rollout.logp is not None
    hf_batch = dataclasses.replace(batch, rollout=dataclasses.replace(batch.rollout, logp=None))
    keeps, all_stats = [], []
    for session, b in ((vllm_session, batch), (hf_session, hf_batch)):
        plan = minibatch_plan(cfg, 7, b.rollout.completion_ids.shape[0], b.mask.device)
        stats, _, _ = statistics(session, None, b, [m for mb in plan[0] for m in mb])
        keep, _ = objective.batch_filter(cfg, session.accelerator, stats, b.adv_tok, b.mask,
                                         torch.Generator().manual_seed(derive_seed(cfg.seed, "filter", 7)))
        keeps.append(keep)
        all_stats.append(stats)
    valid = batch.mask.bool()
    assert (~keeps[0].bool() & valid).any()  # the filter acts (clip_b_mu 0.5, mixed advantages)
    assert torch.equal(keeps[0], keeps[1])
    for k in ("old_logp", "entropy", "disc", "baseline"):
        assert torch.equal(getattr(all_stats[0], k), getattr(all_stats[1], k)), k


def test_entclip_train_with_sampler_vllm_goes_end_to_end_and_its_mismatch_is_float_noise(tmp_path):
    from typer.testing import CliRunner

    from entclip.cli import app

    sets = [a for s in tiny_sets(**SETS, steps=2, eval_every=1) for a in ("--set", s)]
    res = CliRunner().invoke(app, ["train", "--out-dir", str(tmp_path), "--name", "vllm", "-q", *sets])
    assert res.exit_code == 0, res.output
    got = load_run(tmp_path / "vllm")
    assert got.summary["status"] == "completed"
    assert [r["step"] for r in got.metrics] == [1, 2]
    assert [e["step"] for e in got.evals] == [0, 1, 2]
    for row in got.metrics:
        assert 0 <= row["sampling/logp_diff_mean"] <= row["sampling/logp_diff_max"] < FLOAT
        for k in ("min", "mean", "max"):
            assert abs(row[f"sampling/is_ratio_{k}"] - 1) < FLOAT
        assert row["sampling/is_corrected_frac"] == 0.0
        assert row["train/updates"] == 1
