"""Per-step entropy accounting: what the paper predicts a step does to entropy, and what it did.

Numbers per accounted step, all in units of Hbar = mean token entropy over the batch's valid
response tokens (THEORY.md, "What this is and is not"):
- pred_logit: Theorem 3.3 summed over the step's unclipped, unfiltered tokens, each position's logits
  assumed to move alone by lr * w_t * r_t * A_t (e_k - p) / T (w_t = the token's weight in the
  aggregated loss, so it is normalized as the loss is); pred_logit_drive is the same without lr.
- pred_param: <grad_theta Hbar(theta_old), theta_new - theta_old>, first order for any optimizer.
- pred_dz: -(1/T) sum_j S_j dz_j per position with the measured logit change dz, averaged: same
  first-order formula as pred_logit, without the assumption that positions move independently.
- measured: Hbar(theta_new) - Hbar(theta_old) on the same tokens.
With `accounting_unit: update` (the default) every optimizer update u (theta_u -> theta_u+1) is also
accounted on its own, with g_u = grad Hbar(theta_u) taken after each update over the whole batch
(the pass that also measures Hbar(theta_u+1)), and the step gets the sums over its updates:
- pred_param_upd: sum_u <g_u, theta_u+1 - theta_u>, first order per update;
- pred_param2: sum_u 0.5 <g_u + g_u+1, theta_u+1 - theta_u>, the trapezoid rule: second-order
  accurate (its error is third order in the update), exact for a quadratic Hbar;
- order_gap: pred_param2 - pred_param_upd, the second-order part; large next to pred_param2 means
  the updates leave the regime a first-order theory describes;
- pred_logit_eff: Theorem 3.3 with each update's effective plain-gradient learning rate
  eta_u = -<theta_u+1 - theta_u, grad L_u> / |grad L_u|^2 (the optimizer's actual step projected on
  the loss gradient; Adam's is far larger than lr) instead of the nominal lr.
The gaps separate the first-order truncation (pred_param, pred_dz vs measured) from the
independence assumption (pred_logit vs pred_dz).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from entclip.core import losses, theory
from entclip.contracts.metrics import Mean, Metric, Sum

QUADRANTS = {"pos_devpos": (1, 1), "pos_devneg": (1, -1), "neg_devpos": (-1, 1), "neg_devneg": (-1, -1)}


# Entropy accounting keeps the old logits (B, T, V) for pred_dz only up to this many elements
# (about 1 GiB in float32); larger batches or vocabularies report pred_param and measured only.
ACCOUNT_LOGITS_MAX = 2**28

def quadrants(deviation: torch.Tensor, adv_tok: torch.Tensor, mask: torch.Tensor,
              contrib: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(A > 0 / A < 0) x (deviation > 0 / < 0): name -> (share of valid tokens, summed contribution).

    All (B, T); `contrib` is each token's predicted entropy change (Theorem 3.3).
    """
    valid = mask.bool()
    n_valid = max(int(valid.sum()), 1)
    dev_sign, adv_sign = torch.sign(deviation), torch.sign(adv_tok)
    out = {}
    for name, (a, d) in QUADRANTS.items():
        q = valid & (adv_sign == a) & (dev_sign == d)
        out[name] = (float(q.sum()) / n_valid, float(contrib[q].sum()))
    return out


def loss_weights(mask: torch.Tensor, mode: str, constant: float | None,
                 denominator: float | None = None) -> torch.Tensor:
    """(b, T) weight of each token's term in the aggregated loss (aggregate is linear in it)."""
    x = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device, requires_grad=True)
    losses.aggregate(x, mask, mode, constant, denominator).backward()
    return x.grad


@dataclass
class StepAccount:
    """State of one accounted step, from before the first update to after the last.

    Step level (both units): theta_old and g_0 = grad Hbar(theta_old) give pred_param. Update level
    (`per_update`): the engine calls `update_taken` right after each optimizer step (the loss gradient
    still in .grad) and `record` with Hbar and its gradient at the new parameters; theta_u, g_u and
    Hbar(theta_u) roll forward, so three parameter-sized copies live at once (theta_u, g_0, g_u).
    """

    params: list[torch.Tensor]          # theta_old (theta_u when per_update), detached copies
    grad_h: list[torch.Tensor]          # grad_theta Hbar at theta_old (g_0)
    logits: torch.Tensor | None         # (B, T, V) old logits, detached; None: pred_dz is skipped
    h_old: float                        # Hbar(theta_old)
    n_valid: float                      # valid response tokens in the batch (all processes)
    shape: tuple[int, int]              # (B, T) of this process's rows
    per_update: bool = False            # accounting_unit == "update"
    contrib: torch.Tensor = field(init=False)  # (B, T) pred_logit contribution per token
    drive: torch.Tensor = field(init=False)    # (B, T) the same without lr

    def __post_init__(self) -> None:
        self.contrib = torch.zeros(self.shape, device=self.grad_h[0].device if self.grad_h else None)
        self.drive = torch.zeros_like(self.contrib)
        self.grad_u = self.grad_h            # g_u: g_0 until the first update is recorded
        self.h_u = self.h_old                # Hbar(theta_u)
        self.sums = {"pred_param": 0.0, "pred_param_upd": 0.0, "pred_param2": 0.0, "pred_logit_eff": 0.0}
        self.updates = 0                     # updates recorded
        self.last_logits: torch.Tensor | None = None  # (B, T, V) at the latest recorded parameters
        self._drive_mark = 0.0               # drive.sum() when the current update began

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token predictions so far, to restore if an update is skipped."""
        return self.contrib.clone(), self.drive.clone()

    def restore(self, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.contrib, self.drive = saved

    def add_update(self, rows: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor,
                   advantages: torch.Tensor, ratio: torch.Tensor, zero_grad: torch.Tensor,
                   loss_mask: torch.Tensor, weights: torch.Tensor, lr: float, temperature: float) -> None:
        """Theorem 3.3 for one optimizer update on minibatch `rows` (logits at the current params).

        weights: each token's weight in the aggregated loss (times STEER's, if any); zero_grad: tokens
        the clip removed from the gradient. Loss terms beyond the policy term (KL, entropy bonus,
        KL-Cov's penalty) are not part of this prediction; pred_param and pred_dz include them.
        """
        stats = theory.token_stats(logits.detach(), tokens, temperature)
        active = loss_mask.bool() & ~zero_grad
        unit = theory.grpo_logit_delta(stats.disc, stats.baseline, advantages, ratio.detach(), 1.0,
                                       temperature) * weights * active / self.n_valid
        self.drive[rows] += unit
        self.contrib[rows] += lr * unit

    def update_taken(self, params_now: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """Right after an optimizer step (grads = the loss gradient it used): its effective learning rate
        eta = -<theta_now - theta_u, grad L> / |grad L|^2 and the Theorem 3.3 drive of its tokens."""
        step_dot = sq = 0.0
        for p, p0, g in zip(params_now, self.params, grads):
            if g is not None:
                step_dot += float(((p.detach() - p0) * g).sum())
                sq += float((g * g).sum())
        eta = -step_dot / sq if sq > 0 else 0.0
        drive_now = float(self.drive.sum())
        self.sums["pred_logit_eff"] += eta * (drive_now - self._drive_mark)
        self._drive_mark = drive_now

    def record(self, h_new: float, grads_new: list[torch.Tensor], params_now: list[torch.Tensor],
               logits: torch.Tensor | None) -> None:
        """One update accounted: Hbar and g at theta_u+1 (grads_new may be the live .grad tensors: they
        are copied), then theta_u, g_u and Hbar(theta_u) move to theta_u+1."""
        first = trap = step_first = 0.0
        fresh = self.grad_u is self.grad_h  # g_u still is g_0: the next g_u needs its own storage
        new_u = []
        for p, p0, g0, gu, gn in zip(params_now, self.params, self.grad_h, self.grad_u, grads_new):
            d = p.detach() - p0  # theta_u+1 - theta_u
            a, b, c = float((gu * d).sum()), float((gn * d).sum()), float((g0 * d).sum())
            first, trap, step_first = first + a, trap + 0.5 * (a + b), step_first + c
            new_u.append(gn.detach().clone() if fresh else gu.copy_(gn))
            p0.copy_(p.detach())
        self.grad_u = new_u
        self.sums["pred_param_upd"] += first
        self.sums["pred_param2"] += trap
        self.sums["pred_param"] += step_first  # <g_0, theta_new - theta_old> as the sum of its pieces
        self.h_u = h_new
        self.last_logits = logits
        self.updates += 1

    def finish(self, new_logits: torch.Tensor, new_entropy_mean: float, params_now: list[torch.Tensor],
               stats_old, adv_tok: torch.Tensor, mask: torch.Tensor, temperature: float) -> dict[str, Metric]:
        """The step's figures, each with its reduction over processes: this process's share of a sum over
        tokens (Sum), a share of its valid tokens (Mean weighted by them), or a figure every process
        computes alike (Mean of equal values). With per_update, new_logits / new_entropy_mean are those of
        the last record (None / h_old when no update was taken) and params_now is not read."""
        valid = mask.bool()
        if self.per_update:
            pred_param = self.sums["pred_param"]
        else:
            pred_param = sum(float((g * (p - p0)).sum()) for g, p, p0 in zip(self.grad_h, params_now, self.params))
        out: dict[str, Metric] = {"entropy/pred_logit": Sum(float(self.contrib.sum())),
                                  "entropy/pred_logit_drive": Sum(float(self.drive.sum())),
                                  "entropy/pred_param": Mean(pred_param)}
        if self.per_update:
            out.update({"entropy/pred_param_upd": Mean(self.sums["pred_param_upd"]),
                        "entropy/pred_param2": Mean(self.sums["pred_param2"]),
                        "entropy/order_gap": Mean(self.sums["pred_param2"] - self.sums["pred_param_upd"]),
                        # eta_u is global, the drive this process's tokens': a share of the sum
                        "entropy/pred_logit_eff": Sum(self.sums["pred_logit_eff"]),
                        "entropy/updates_accounted": Mean(float(self.updates))})
        if self.logits is not None and new_logits is not None:  # not kept for large batches (engine)
            # Chunked over positions: no (B, T, V) difference nor float32 copy of either logits.
            dz_pred = theory.entropy_delta_between(self.logits, new_logits, temperature)  # (B, T)
            out["entropy/pred_dz"] = Sum(float(dz_pred[valid].sum()) / self.n_valid)
        out.update({"entropy/measured": Mean(new_entropy_mean - self.h_old),
                    "entropy/mean_after": Mean(new_entropy_mean)})
        n_local = int(mask.sum())
        for name, (share, pred) in quadrants(stats_old.disc - stats_old.baseline, adv_tok, mask, self.contrib).items():
            out[f"quad/{name}_share"] = Mean(share, n_local)
            out[f"quad/{name}_pred"] = Sum(pred)
        return out
