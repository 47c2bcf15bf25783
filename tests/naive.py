"""A slow, naive reference of one GRPO training step, held against the engine's gradients.

`capture(cfg)` runs `Trainer.step` on the tiny model and records, at every optimizer update, the
parameters the update started from and every `p.grad` the engine handed to the optimizer (with
max_grad_norm=0 these are the raw gradients). `Reference(cap).update(u)` rebuilds update u's loss from
the specification below alone: plain Python loops over tokens, float64, the loss a Python sum of
scalar terms, one backward; its gradient is compared with the engine's.

Written from the specification, not from entclip's objective, losses or methods: only plumbing is
shared - the rollout the engine drew, its row order (`minibatch_plan`), the model's forward
(`completion_logits`), `derive_seed`. The specification, in short (T the temperature everywhere):
- A = r - group mean (/ (unbiased std + 1e-6) with scale_std), 0 for a group of equal rewards.
- p = softmax(z / T); H = -sum p log p; S* = p_k (log p_k + H); E_p[S] = sum_j p_j^2 (log p_j + H).
  Old statistics at the step's start theta0, on every row, before the first update; the KL
  reference is the run's start.
- Per token: policy = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp - old_logp),
  capped at -c A for A < 0 (dual clip); KL-Cov: -A r, plus beta |logp - old_logp| on the top
  max(1, floor(frac n)) tokens by (A - mean A)(logp - mean logp) of the micro-batch; STEER: times a
  weight linear in |Omega| from w_max to w_min, Omega = (A / p_old) p (1 - p)(log p + H), after the
  dual clip. L_t = keep_t w_t policy_t + kl_coef k3_t, k3 = exp(d) - d - 1, d = ref_logp - logp.
- keep: Clip_B / Clip_V / sign once per rollout from the old statistics (normalizer: kept tokens);
  high_entropy (H >= (1 - rho) quantile) and Clip-Cov (K random band tokens not ratio-clipped,
  drawn with derive_seed(seed, "clip_cov", step, epoch, minibatch, micro, rank)) per micro-batch from
  the current forward (normalizer: all valid tokens); filter_scope / filter_normalizer override.
- Aggregation over the whole minibatch: token-mean, seq-mean-token-mean or constant over the
  normalizer's tokens N. Entropy bonus per micro-batch: coef * mean of H over valid & keep (valid
  for Clip-Cov) / J micro-batches, through H; adaptive: applied only while the last update's entropy
  (start: +inf) is at or below the target, coef +- delta per update within [min, max].

Discrete choices (ratio clip, thresholds, top-K, quantiles) are made in float64 here and in float32
by the engine; `Margins` records how close each choice came to its boundary, so a test can assert that
no choice was a coin flip between the two precisions instead of failing obscurely.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from entclip.training.batch import derive_seed, minibatch_plan
from entclip.training.engine import Trainer, collect, score
from entclip.training.rollout import completion_logits

NEAR = 1e-6  # a float32-vs-float64 difference is ~1e-7 relative; closer than this is a coin flip


def val(x) -> float:
    """A number, without its graph."""
    return float(x.detach()) if torch.is_tensor(x) else float(x)


# ---- the engine's side: run one step, record every update --------------------------------------

@dataclass
class Update:
    epoch: int
    minibatch: int
    params: dict[str, torch.Tensor]  # before the optimizer step
    grads: dict[str, torch.Tensor]  # what the optimizer received


@dataclass
class Capture:
    cfg: object
    trainer: Trainer
    step: int
    theta_ref: dict[str, torch.Tensor]  # the run's start: the KL reference
    theta0: dict[str, torch.Tensor]  # the captured step's start: the old statistics
    coef0: float  # the adaptive bonus's state as the captured step began
    last_entropy0: float
    roll: object
    rewards: torch.Tensor
    plan: list  # [epoch][minibatch][micro] -> row index tensors
    updates: list[Update]
    metrics: dict


def capture(cfg, wrap_sampler) -> Capture:
    """Steps 1..cfg.steps of a fresh Trainer; the last one's rollout and every optimizer update recorded."""
    trainer = Trainer(cfg, None, log=lambda s: None, wrap_sampler=wrap_sampler)
    named = list(trainer.session.policy.named_parameters())
    theta_ref = {n: p.detach().clone() for n, p in named}
    step = cfg.steps
    for earlier in range(1, step):
        trainer.step(earlier)
    theta0 = {n: p.detach().clone() for n, p in named}
    coef0, last_entropy0 = trainer.state.entropy_coef, trainer.state.last_entropy
    # The torch optimizer inside accelerate's wrapper: the scheduler patched the wrapper's step.
    inner = trainer.learner.opt.optimizer
    real_step = inner.step

    updates: list[Update] = []
    order = [(e, i) for e in range(cfg.epochs) for i in range(cfg.minibatches)]

    def opt_step(*args, **kwargs):
        e, i = order[len(updates)]
        updates.append(Update(e, i, {n: p.detach().clone() for n, p in named},
                              {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
                               for n, p in named}))
        return real_step(*args, **kwargs)

    inner.step = opt_step
    batch = score(trainer.session, collect(trainer.session, step))  # the step's own batch, kept
    metrics = trainer.step(step, batch)
    roll, rewards = batch.rollout, batch.rewards
    plan = minibatch_plan(cfg, step, roll.completion_ids.shape[0], roll.completion_ids.device)
    assert len(updates) == len(order), f"{len(updates)} optimizer updates, expected {len(order)} (one skipped?)"
    return Capture(cfg, trainer, step, theta_ref, theta0, coef0, last_entropy0, roll, rewards, plan, updates, metrics)


# ---- the reference ------------------------------------------------------------------------------

@dataclass
class Tok:
    """One valid completion token at some parameters: log p_k and H (0-d tensors), S*, E_p[S] (floats)."""

    logp: torch.Tensor
    H: torch.Tensor
    s_star: float
    e_s: float


@dataclass
class Margins:
    """The closest any discrete choice came to its boundary, relative to its scale."""

    closest: dict[str, float] = field(default_factory=dict)

    def note(self, what: str, distance: float) -> None:
        self.closest[what] = min(self.closest.get(what, math.inf), abs(distance))

    def assert_clear(self) -> None:
        near = {k: v for k, v in self.closest.items() if v < NEAR}
        assert not near, f"a discrete choice sits within {NEAR} of its boundary (float32 vs float64 may differ): {near}"


def token_table(model, roll, rows: list[int], temperature: float) -> dict[tuple[int, int], Tok]:
    """Per valid token (row, t): statistics of p = softmax(z / T), written out element by element."""
    T = roll.completion_ids.shape[1]
    idx = torch.tensor(rows)
    logits = completion_logits(model, roll.input_ids[idx], roll.attention_mask[idx], T)  # (b, T, V)
    out = {}
    for a, b in enumerate(rows):
        for t in range(T):
            if not roll.completion_mask[b, t]:
                continue
            z = logits[a, t] / temperature  # (V,)
            top = z.max().detach()
            lse = top + torch.log(sum(torch.exp(z[j] - top) for j in range(z.shape[0])))
            logp = [z[j] - lse for j in range(z.shape[0])]  # log p_j
            p = [torch.exp(lj) for lj in logp]
            H = -sum(pj * lj for pj, lj in zip(p, logp))
            k = int(roll.completion_ids[b, t])
            h = float(H.detach())
            pf, lf = [float(x.detach()) for x in p], [float(x.detach()) for x in logp]
            s_star = pf[k] * (lf[k] + h)
            e_s = sum(pj * pj * (lj + h) for pj, lj in zip(pf, lf))
            out[(b, t)] = Tok(logp[k], H, s_star, e_s)
    return out


def advantages(rewards: list[float], G: int, scale_std: bool) -> list[float]:
    adv = []
    for g in range(0, len(rewards), G):
        r = rewards[g:g + G]
        mean = sum(r) / G
        if all(x == r[0] for x in r):
            adv += [0.0] * G
            continue
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        adv += [(x - mean) / (std + 1e-6) if scale_std else x - mean for x in r]
    return adv


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics, as torch.quantile."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def pop_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))


# What `Reference(cap, off=...)` can leave out, to show that a comparison notices each ingredient.
OFF = {"keep": "every valid token kept (the method's keep-mask never reaches the loss)",
       "clip": "no PPO ratio clip (and no dual clip)", "dual": "no dual clip", "kl": "no k3 KL term",
       "bonus": "no entropy bonus", "weights": "STEER weights all 1", "penalty": "no KL-Cov penalty",
       "agg": "token-mean aggregation", "temperature": "temperature 1",
       "ref": "KL to the step's start (the old policy) instead of the run's start"}


class Reference:
    """The captured step's updates recomputed from the specification, one `update(u)` at a time
    (in order: the adaptive bonus's coefficient is carried from one update to the next)."""

    def __init__(self, cap: Capture, off: frozenset[str] = frozenset()):
        assert off <= OFF.keys(), off - OFF.keys()
        self.cap, self.cfg, self.off = cap, cap.cfg, off
        cfg, roll = cap.cfg, cap.roll
        self.temperature = 1.0 if "temperature" in off else cfg.temperature
        self.loss_agg = "token-mean" if "agg" in off else cfg.loss_agg
        self.model = copy.deepcopy(cap.trainer.session.policy).double()
        self.margins = Margins()
        self.B, self.T = roll.completion_ids.shape
        self.valid = [(b, t) for b in range(self.B) for t in range(self.T) if roll.completion_mask[b, t]]
        self.A = advantages([float(x) for x in cap.rewards], cfg.group_size, cfg.scale_std)
        with torch.no_grad():  # old statistics at the step's start; the KL reference at the run's
            self._load(cap.theta0)
            self.old = token_table(self.model, roll, list(range(self.B)), self.temperature)
            self._load(cap.theta0 if "ref" in off else cap.theta_ref)
            self.ref_logp = {bt: val(tok.logp) for bt, tok in
                             token_table(self.model, roll, list(range(self.B)), self.temperature).items()}
        self.method = cfg.entropy_control
        micro_kind = self.method in ("high_entropy", "clip_cov")
        self.scope = cfg.filter_scope if cfg.filter_scope != "auto" else ("micro" if micro_kind else "rollout")
        self.normalizer = (cfg.filter_normalizer if cfg.filter_normalizer != "auto"
                           else ("all" if micro_kind else "kept"))
        self.rollout_keep = self._rollout_keep()
        self.coef = cap.coef0  # the adaptive bonus's state, carried over the updates (and steps)
        self.last_entropy = cap.last_entropy0
        self.applied: list[float] = []  # the bonus coefficient each update used
        self.dropped: list[int] = []  # per update: valid tokens whose policy term the method dropped
        self.moved_late = 0  # tokens with a ratio outside the clip range, at updates after the first
        self.dual_active = 0  # A < 0 tokens whose loss the dual clip capped
        self.steer_spread = 0.0  # the largest w_max - w_min seen in a micro-batch
        self.kl_cov_selected = 0

    def _load(self, params: dict[str, torch.Tensor]) -> None:
        for n, p in self.model.named_parameters():
            p.data.copy_(params[n].double())

    # -- keep-masks decided once per rollout batch, from the old statistics --------------------------
    def _rollout_keep(self) -> dict[tuple[int, int], bool]:
        cfg, old, A, m = self.cfg, self.old, self.A, self.method
        keep = {bt: True for bt in self.valid}
        if m == "clip_b":
            s = {bt: old[bt].s_star for bt in self.valid}
            mean = sum(s.values()) / len(s)
            sigma = pop_std(list(s.values()))
            if sigma >= 1e-12:
                for bt in self.valid:
                    x = s[bt] - mean
                    if A[bt[0]] < 0:
                        self.margins.note("clip_b threshold", (x + cfg.clip_b_mu * sigma) / sigma)
                        keep[bt] = not x < -cfg.clip_b_mu * sigma
        elif m == "clip_v":
            x = {bt: old[bt].s_star - old[bt].e_s for bt in self.valid}
            sigma = pop_std(list(x.values()))
            if sigma >= 1e-12:
                viol = []
                for bt in self.valid:
                    if A[bt[0]] <= 0:
                        self.margins.note("clip_v threshold", (x[bt] + cfg.clip_v_mu * sigma) / sigma)
                        if x[bt] < -cfg.clip_v_mu * sigma:
                            viol.append(bt)
                neg = [bt for bt in viol if A[bt[0]] < 0]
                drop = viol
                if cfg.clip_v_max_frac is not None:
                    K = max(math.floor(cfg.clip_v_max_frac * len(self.valid)), 1)
                    if len(neg) > K:  # only the K most negative A < 0 violators, and every A = 0 one
                        ranked = sorted(neg, key=lambda bt: x[bt])
                        self.margins.note("clip_v cap order", (x[ranked[K]] - x[ranked[K - 1]]) / sigma)
                        drop = ranked[:K] + [bt for bt in viol if A[bt[0]] == 0]
                for bt in drop:
                    keep[bt] = False
        elif m == "sign":
            for bt in self.valid:
                o = old[bt]
                if cfg.sign_statistic == "s_star":  # sign(S*) = sign(log p_k + H)
                    s = o.s_star
                    self.margins.note("sign statistic", (val(o.logp) + val(o.H)) / max(val(o.H), 1e-3))
                else:
                    s = o.s_star - o.e_s
                    self.margins.note("sign statistic", s / max(abs(o.s_star), abs(o.e_s), 1e-12))
                ok = s > 0 if cfg.sign_deviation == "pos" else s < 0
                a = A[bt[0]]
                if cfg.sign_samples == "pos":
                    ok = ok and a > 0
                elif cfg.sign_samples == "neg":
                    ok = ok and a < 0
                keep[bt] = ok
        elif m == "high_entropy" and self.scope == "rollout":
            keep = self._high_entropy({bt: val(old[bt].H) for bt in self.valid})
        elif m == "clip_cov" and self.scope == "rollout":
            seed = derive_seed(cfg.seed, "filter", self.cap.step)  # the engine's per-step filter generator
            keep = self._clip_cov(self.valid, {bt: val(old[bt].logp) for bt in self.valid},
                                  {bt: 1.0 for bt in self.valid}, seed)
        return keep

    def _high_entropy(self, H: dict) -> dict:
        tau = quantile(list(H.values()), 1 - self.cfg.high_entropy_rho)
        for h in H.values():
            if h != tau:
                self.margins.note("high_entropy quantile", (h - tau) / max(abs(tau), 1e-3))
        return {bt: h >= tau for bt, h in H.items()}

    def _clip_cov(self, toks: list, logp: dict, ratio: dict, seed: int) -> dict:
        cfg, A = self.cfg, self.A
        mean_a = sum(A[b] for b, _ in toks) / len(toks)
        mean_l = sum(logp[bt] for bt in toks) / len(toks)
        cand = []
        for bt in toks:  # row-major: the micro-batch's rows in plan order, then t
            a, r = A[bt[0]], ratio[bt]
            cov = (a - mean_a) * (logp[bt] - mean_l)
            if a != 0:
                self.margins.note("clip_cov ratio clip", r - (1 + cfg.eps_high if a > 0 else 1 - cfg.eps_low))
            clipped = (a > 0 and r > 1 + cfg.eps_high) or (a < 0 and r < 1 - cfg.eps_low)
            if cfg.cov_lb < cov < cfg.cov_ub and not clipped:
                cand.append(bt)
        K = max(int(cfg.cov_frac * len(toks)), 1)
        pick = torch.randperm(len(cand), generator=torch.Generator().manual_seed(seed))[:K]
        keep = {bt: True for bt in toks}
        for c in pick.tolist():
            keep[cand[c]] = False
        return keep

    def _micro_keep(self, up: Update, j: int, toks, cur, ratio) -> dict:
        if self.method == "high_entropy" and self.scope == "micro":
            return self._high_entropy({bt: val(cur[bt].H) for bt in toks})
        if self.method == "clip_cov" and self.scope == "micro":
            seed = derive_seed(self.cfg.seed, "clip_cov", self.cap.step, up.epoch, up.minibatch, j, 0)
            return self._clip_cov(toks, {bt: val(cur[bt].logp) for bt in toks},
                                  {bt: val(ratio[bt]) for bt in toks}, seed)
        return {bt: self.rollout_keep[bt] for bt in toks}

    def _kl_cov_top(self, toks, cur) -> set:
        A = self.A
        mean_a = sum(A[b] for b, _ in toks) / len(toks)
        mean_l = sum(val(cur[bt].logp) for bt in toks) / len(toks)
        cov = [(A[bt[0]] - mean_a) * (val(cur[bt].logp) - mean_l) for bt in toks]
        K = max(1, math.floor(self.cfg.kl_cov_frac * len(toks)))
        ranked = sorted(range(len(toks)), key=lambda i: (-cov[i], i))  # largest first; ties: lowest index
        if K < len(toks) and cov[ranked[K]] != cov[ranked[K - 1]]:
            self.margins.note("kl_cov top-K", (cov[ranked[K - 1]] - cov[ranked[K]]) / max(abs(cov[ranked[0]]), 1e-12))
        self.kl_cov_selected += K
        return {toks[i] for i in ranked[:K]}

    def _steer_weights(self, toks, cur) -> dict:
        cfg, A = self.cfg, self.A
        om = {}
        for bt in toks:
            p = min(max(math.exp(val(cur[bt].logp)), 1e-8), 1 - 1e-8)
            p_old = max(math.exp(val(self.old[bt].logp)), 1e-8)
            om[bt] = abs(A[bt[0]] / p_old * p * (1 - p) * (math.log(p) + val(cur[bt].H)))
        lo, hi = min(om.values()), max(om.values())
        if hi == lo:
            return {bt: (cfg.steer_w_max + cfg.steer_w_min) / 2 for bt in toks}
        w = {bt: cfg.steer_w_max - (om[bt] - lo) / (hi - lo) * (cfg.steer_w_max - cfg.steer_w_min) for bt in toks}
        self.steer_spread = max(self.steer_spread, max(w.values()) - min(w.values()))
        return w

    def _policy(self, a: float, r: torch.Tensor) -> torch.Tensor:
        """-min(r A, clip(r) A), then the dual clip's cap -c A for A < 0."""
        cfg, rf = self.cfg, val(r)
        if "clip" in self.off:
            return -r * a
        if a != 0:
            self.margins.note("ratio clip", rf - (1 + cfg.eps_high if a > 0 else 1 - cfg.eps_low))
        pol = -torch.minimum(r * a, torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
        if cfg.dual_clip_c is not None and a < 0 and "dual" not in self.off:
            cap_ = -cfg.dual_clip_c * a
            self.margins.note("dual clip", (val(pol) - cap_) / abs(a))
            if val(pol) > cap_:
                self.dual_active += 1
            pol = torch.minimum(pol, torch.tensor(cap_, dtype=torch.float64))
        return pol

    # -- one optimizer update ------------------------------------------------------------------------
    def update(self, u: int, logp_leaves: bool = False):
        """Update u's loss from the spec, backward; returns (gradient vector, {(b, t): Tok}, keep).

        With `logp_leaves` each token's log p enters the loss as a leaf (requires_grad, its .grad is
        d loss / d log p_t afterwards); the entropy bonus still reaches the parameters through H."""
        cap, cfg, A, off = self.cap, self.cfg, self.A, self.off
        up = cap.updates[u]
        micro = [[int(r) for r in m] for m in cap.plan[up.epoch][up.minibatch]]
        self._load(up.params)
        self.model.zero_grad(set_to_none=True)
        J = len(micro)
        on = cfg.entropy_target is None or self.last_entropy <= cfg.entropy_target
        if cfg.entropy_target is not None and math.isfinite(self.last_entropy):
            self.margins.note("entropy target", self.last_entropy - cfg.entropy_target)
        applied = 0.0 if "bonus" in off else (self.coef if on else 0.0)
        self.applied.append(applied)
        zero = torch.tensor(0.0, dtype=torch.float64)
        terms = []  # ((row, t), L_t, in the normalizer N)
        bonus, world_num, world_den, dropped = zero, 0.0, 0, 0
        cur_all, keep_all = {}, {}
        for j, rows in enumerate(micro):
            cur = token_table(self.model, cap.roll, rows, self.temperature)
            toks = [(b, t) for b in rows for t in range(self.T) if (b, t) in cur]
            if logp_leaves:
                for bt in toks:
                    cur[bt].logp = cur[bt].logp.detach().requires_grad_(True)
            ratio = {bt: torch.exp(cur[bt].logp - self.old[bt].logp) for bt in toks}
            keep = self._micro_keep(up, j, toks, cur, ratio)
            dropped += sum(not keep[bt] for bt in toks)
            if "keep" in off:
                keep = {bt: True for bt in toks}
            w = ({bt: 1.0 for bt in toks} if self.method != "steer" or "weights" in off
                 else self._steer_weights(toks, cur))
            top = self._kl_cov_top(toks, cur) if self.method == "kl_cov" else set()
            for bt in toks:
                a, r, logp = A[bt[0]], ratio[bt], cur[bt].logp
                if u > 0 and not (1 - cfg.eps_low <= val(r) <= 1 + cfg.eps_high):
                    self.moved_late += 1
                if self.method == "kl_cov":  # no ratio clip; the top-K by covariance are penalized
                    pol = -a * r
                    if bt in top and "penalty" not in off:
                        pol = pol + cfg.kl_cov_beta * torch.abs(logp - self.old[bt].logp)
                else:
                    pol = self._policy(a, r)
                L = (1.0 if keep[bt] else 0.0) * w[bt] * pol
                if cfg.kl_coef > 0 and "kl" not in off:  # k3 to the run's start
                    d = self.ref_logp[bt] - logp
                    L = L + cfg.kl_coef * (torch.exp(d) - d - 1)
                terms.append((bt, L, keep[bt] if self.normalizer == "kept" else True))
            # the entropy bonus per micro-batch (TRL): mean H over its bonus tokens, divided by J
            bm = [bt for bt in toks if self.method == "clip_cov" or keep[bt]]
            if applied > 0:
                bonus = bonus + applied * sum((cur[bt].H for bt in bm), zero) / max(len(bm), 1) / J
            world_num += sum(val(cur[bt].H) for bt in bm)
            world_den += len(bm)
            cur_all.update(cur)
            keep_all.update(keep)
        self.dropped.append(dropped)
        loss = self._aggregate(terms, micro) - bonus
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
                          for _, p in self.model.named_parameters()])
        if cfg.entropy_target is not None:  # after the update: coef moves toward the target
            world = world_num / max(world_den, 1)
            self.margins.note("entropy target", world - cfg.entropy_target)
            if world <= cfg.entropy_target:
                self.coef = min(self.coef + cfg.entropy_coef_delta, cfg.entropy_coef_max)
            else:
                self.coef = max(self.coef - cfg.entropy_coef_delta, cfg.entropy_coef_min)
            self.last_entropy = world
        return grad, cur_all, keep_all

    def _aggregate(self, terms, micro) -> torch.Tensor:
        """The minibatch's loss over all its micro-batches, as the specification's three modes; a
        token outside the normalizer N enters as 0 * L_t (so its gradient is an exact 0, not absent)."""
        cfg = self.cfg
        n_rows = sum(len(m) for m in micro)
        zero = torch.tensor(0.0, dtype=torch.float64)
        masked = [(bt, (1.0 if in_n else 0.0) * L, in_n) for bt, L, in_n in terms]
        if self.loss_agg == "token-mean":
            n = sum(1 for _, _, in_n in masked if in_n)
            return sum((NL for _, NL, _ in masked), zero) / max(n, 1)
        if self.loss_agg == "constant":
            C = cfg.loss_agg_constant or cfg.max_new_tokens
            return sum((NL for _, NL, _ in masked), zero) / (n_rows * C)
        total = zero  # seq-mean-token-mean
        for b in [r for m in micro for r in m]:
            row = [(NL, in_n) for (bb, _), NL, in_n in masked if bb == b]
            total = total + sum((NL for NL, _ in row), zero) / max(sum(in_n for _, in_n in row), 1)
        return total / n_rows

    def run(self) -> list[torch.Tensor]:
        """Every update's gradient, in order."""
        return [self.update(u)[0] for u in range(len(self.cap.updates))]


def engine_grad(cap: Capture, u: int) -> torch.Tensor:
    g = cap.updates[u].grads
    return torch.cat([g[n].reshape(-1).double() for n, _ in cap.trainer.session.policy.named_parameters()])


def rel_err(g_e: torch.Tensor, g_r: torch.Tensor) -> float:
    return float((g_e - g_r).norm() / g_r.norm())
