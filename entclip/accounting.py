"""Per-step entropy accounting: what the paper predicts a step does to entropy, and what it did.

Four numbers per accounted step, all in units of Hbar = mean token entropy over the batch's valid
response tokens (THEORY.md, "What this is and is not"):
- pred_logit: Theorem 3.3 summed over the step's unclipped, unfiltered tokens, each position's logits
  assumed to move alone by lr * w_t * r_t * A_t (e_k - p) / T (w_t = the token's weight in the
  aggregated loss, so it is normalized as the loss is); pred_logit_drive is the same without lr.
- pred_param: <grad_theta Hbar(theta_old), theta_new - theta_old>, first order for any optimizer.
- pred_dz: -(1/T) sum_j S_j dz_j per position with the measured logit change dz, averaged: same
  first-order formula as pred_logit, without the assumption that positions move independently.
- measured: Hbar(theta_new) - Hbar(theta_old) on the same tokens.
The gaps separate the first-order truncation (pred_param, pred_dz vs measured) from the
independence assumption (pred_logit vs pred_dz).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from entclip import losses, theory

QUADRANTS = {"pos_devpos": (1, 1), "pos_devneg": (1, -1), "neg_devpos": (-1, 1), "neg_devneg": (-1, -1)}


def quadrants(deviation: torch.Tensor, adv_tok: torch.Tensor, mask: torch.Tensor,
              contrib: torch.Tensor) -> dict[str, float]:
    """(A > 0 / A < 0) x (deviation > 0 / < 0): share of valid tokens and summed contribution each.

    All (B, T); `contrib` is each token's predicted entropy change (Theorem 3.3).
    """
    valid = mask.bool()
    n_valid = max(int(valid.sum()), 1)
    dev_sign, adv_sign = torch.sign(deviation), torch.sign(adv_tok)
    out = {}
    for name, (a, d) in QUADRANTS.items():
        q = valid & (adv_sign == a) & (dev_sign == d)
        out[f"quad/{name}_share"] = float(q.sum()) / n_valid
        out[f"quad/{name}_pred"] = float(contrib[q].sum())
    return out


def loss_weights(mask: torch.Tensor, mode: str, constant: float | None,
                 denominator: float | None = None) -> torch.Tensor:
    """(b, T) weight of each token's term in the aggregated loss (aggregate is linear in it)."""
    x = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device, requires_grad=True)
    losses.aggregate(x, mask, mode, constant, denominator).backward()
    return x.grad


@dataclass
class StepAccount:
    """State of one accounted step, from before the first update to after the last."""

    params: list[torch.Tensor]          # theta_old, detached copies
    grad_h: list[torch.Tensor]          # grad_theta Hbar at theta_old
    logits: torch.Tensor | None         # (B, T, V) old logits, detached; None: pred_dz is skipped
    h_old: float                        # Hbar(theta_old)
    n_valid: float                      # valid response tokens in the batch (all processes)
    shape: tuple[int, int]              # (B, T) of this process's rows
    contrib: torch.Tensor = field(init=False)  # (B, T) pred_logit contribution per token
    drive: torch.Tensor = field(init=False)    # (B, T) the same without lr

    def __post_init__(self) -> None:
        self.contrib = torch.zeros(self.shape, device=self.grad_h[0].device if self.grad_h else None)
        self.drive = torch.zeros_like(self.contrib)

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

    def finish(self, new_logits: torch.Tensor, new_entropy_mean: float, params_now: list[torch.Tensor],
               stats_old, adv_tok: torch.Tensor, mask: torch.Tensor, temperature: float) -> dict[str, float]:
        valid = mask.bool()
        pred_param = sum(float((g * (p - p0)).sum()) for g, p, p0 in zip(self.grad_h, params_now, self.params))
        out = {"entropy/pred_logit": float(self.contrib.sum()),
               "entropy/pred_logit_drive": float(self.drive.sum()),
               "entropy/pred_param": pred_param}
        if self.logits is not None and new_logits is not None:  # not kept for large batches (engine)
            # Chunked over positions: no (B, T, V) difference nor float32 copy of either logits.
            dz_pred = theory.entropy_delta_between(self.logits, new_logits, temperature)  # (B, T)
            out["entropy/pred_dz"] = float(dz_pred[valid].sum()) / self.n_valid
        out.update({"entropy/measured": new_entropy_mean - self.h_old,
                    "entropy/mean_after": new_entropy_mean})
        out.update(quadrants(stats_old.disc - stats_old.baseline, adv_tok, mask, self.contrib))
        return out
