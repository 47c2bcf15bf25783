"""The method registry: every entropy-control method and any-method option, declared once.

A declaration is pure data plus a reference to its function in losses.py / methods.py: its config
keys (each with its default, its help and the keyword of the function it sets), the statistics the
function reads, its place in the one objective (token filter, token weight or loss term), when a
filter selects (scope) and what its dropped tokens leave (normalizer), the reference it follows and
its presets. Everything else reads it:

- contracts/config.py: the method keys' defaults and help (`Config` fields), which keys each method
  reads (`METHOD_KEYS`, the inert-setting warnings), `FILTERS`, `MICRO_FILTERS`, and the defaults of
  `Config.scope` / `Config.normalizer`;
- training/objective.py: which function to call where, with which statistics and which keys, and
  whether the update reads the current forward's entropy (`objective.update_reads_entropy`);
- README.md's method table (`method_table()`, written by scripts/method_table.py; a test holds the
  README to it) and the CLI's `--entropy-control` help (`method_choices_help()`).

A method's own key reaches its function in one look-up: the objective passes each declared key whose
`arg` is set as that keyword argument, e.g. `clip_v_mu` -> `losses.clip_v_mask(mu=...)`.
Never a config object here (core layer): names, values and functions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from entclip.core import losses, methods

# ---- vocabulary ---------------------------------------------------------------------------

# Places in the objective: aggregate(weight * keep * policy_loss, normalizer) (+ KL, - bonus).
FILTER = "token filter"   # a keep-mask: a dropped token's policy term is zeroed
WEIGHT = "token weight"   # a per-token factor on the policy term
LOSS = "loss term"        # a method's per-token policy loss in place of the clipped surrogate (KL-Cov),
                          # or an option's term of the loss (the entropy bonus)
# When a token filter selects, and what its dropped tokens leave.
ROLLOUT, MICRO = "rollout", "micro"
KEPT, ALL = "kept", "all"

# The statistics a function may read (its `inputs`), by the name the objective supplies them under.
STATISTICS: Mapping[str, str] = MappingProxyType({
    "disc": "S*, the entropy discriminator of the sampled token (theory.token_stats)",
    "baseline": "E_p[S], the discriminator's expectation under the policy (the vocabulary centre)",
    "entropy": "H, the token entropy (detached)",
    "logp": "log p of the sampled token under the policy being updated (at rollout scope: the sampling "
            "policy's, which it equals on the first update)",
    "old_logp": "log p of the sampled token under the sampling policy",
    "adv": "the advantage, per token",
    "mask": "the valid (non-padding) tokens",
    "generator": "the torch.Generator of a seeded draw",
    "ratio_clipped": "tokens the ratio clip clips (none before the first update)",
    "policy_loss": "the per-token policy loss so far (the clipped surrogate or a method's loss term)",
})


@dataclass(frozen=True)
class Key:
    """One config key: its default and help (the `Config` field's), and `arg`, the keyword argument
    of the method's function it sets (None: read elsewhere, e.g. by the objective or the engine)."""

    name: str
    default: Any
    help: str
    arg: str | None = None


@dataclass(frozen=True)
class Adaptive:
    """How the adaptive threshold reads a discriminator filter: its standardized deviation z(inputs)
    and whether tokens with A = 0 are eligible for dropping (Clip_V's released rule)."""

    z: Callable[..., Any]
    inputs: tuple[str, ...]
    include_zero_adv: bool


@dataclass(frozen=True)
class Method:
    """One entropy-control method (`Config.entropy_control`) or any-method option (`option=True`).

    keys: the keys README's table lists for it; each is read only by the methods listing it, so a
    changed key under another method gets an "has no effect" warning. more_keys: read too, with
    their own rules (the paper rule's band, the adaptive threshold's clamps). fn(*inputs, **kwargs):
    `inputs` name STATISTICS in fn's positional order, `extra` maps further keywords of fn to
    statistics, kwargs come from the keys with an `arg`. A filter declares its scopes (the first is
    its default; its reference's) and its default normalizer: "kept" = a dropped token leaves the
    loss, its normalizer, the KL and the entropy bonus; "all" = only its policy term.
    """

    name: str
    label: str                       # short name in messages
    title: str                       # README's method column
    summary: str                     # a few words for the CLI's --entropy-control help
    place: str | None                # FILTER, WEIGHT, LOSS (an option: what it changes); None: nothing
    follows: str                     # the reference it follows (default behaviour), README's column
    keys: tuple[Key, ...] = ()
    more_keys: tuple[Key, ...] = ()
    fn: Callable[..., Any] | None = None
    inputs: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    differentiates: tuple[str, ...] = ()  # inputs its gradient flows through (the rest are detached)
    scopes: tuple[str, ...] = (ROLLOUT,)
    normalizer: str = KEPT
    gather_micro: bool = False       # micro scope: select over this micro-batch of every process
    detach_only: bool = False        # a dropped token leaves the policy term only, never the bonus
    adaptive: Adaptive | None = None  # how ADAPTIVE_MU chooses its threshold (None: it does not apply)
    ignores: tuple[str, ...] = ()    # other keys that do nothing with it ...
    ignores_why: str = ""            # ... and why
    expects: tuple[tuple[str, str], ...] = ()  # (key, why): its reference always sets it
    presets: tuple[str, ...] = ()    # shipped presets (brace / glob patterns as README writes them)
    # ---- options only
    option: bool = False
    of: tuple[str, ...] = ()         # the methods it modifies (empty: any method)
    switch: tuple[str, ...] = ()     # keys that turn it on when set off their default (alternatives)
    shows: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # README: key: value

    @property
    def scope(self) -> str:
        """The default scope: the reference's."""
        return self.scopes[0]

    @property
    def needs(self) -> tuple[str, ...]:
        """The statistics it reads (inputs and extra, less the mask and the generator)."""
        names = (*self.inputs, *self.extra.values())
        return tuple(s for s in dict.fromkeys(names) if s not in ("mask", "generator"))

    def in_update(self, scope: str) -> bool:
        """Whether it acts inside the update, on the current forward (not once per rollout batch)."""
        if self.place is None:
            return False
        if self.place == FILTER:
            return scope == MICRO
        return not self.of or any(METHODS[m].in_update(scope) for m in self.of)

    def reads_detached(self, scope: str) -> tuple[str, ...]:
        """The statistics of the current forward it reads inside the update without their gradient."""
        if not self.in_update(scope):
            return ()
        return tuple(s for s in self.needs if s not in self.differentiates)

    def is_on(self, values: Mapping[str, Any]) -> bool:
        """An option is on when one of its switch keys is off its default (values: key -> value)."""
        return any(values[k] != KEYS[k].default for k in self.switch)

    def all_keys(self) -> tuple[Key, ...]:
        return (*self.keys, *((FILTER_SCOPE, FILTER_NORMALIZER) if self.place == FILTER else ()),
                *self.more_keys)

    def key_for(self, arg: str) -> str | None:
        """The key that sets fn's keyword `arg` (None if none does)."""
        return next((k.name for k in self.all_keys() if k.arg == arg), None)


# ---- keys shared by several methods --------------------------------------------------------

FILTER_RULE = Key("filter_rule", "released", "released = one-sided on negative advantages; paper = two-sided band",
                  arg="rule")
PAPER_BAND = (
    Key("filter_mu_low", None, "paper rule: lower band width (default: the method's mu)", arg="mu_low"),
    Key("filter_mu_high", None, "paper rule: upper band width (default: the method's mu)", arg="mu_high"),
)
FILTER_NORMALIZER = Key(
    "filter_normalizer", "auto", "what a token filter's dropped tokens leave: kept = the loss, its normalizer, "
    "the KL and the entropy bonus (Trinity-RFT: Clip_B, Clip_V, sign); all = only their policy term, the "
    "normalizer and KL keep every valid token (TRL 80/20, verl Clip-Cov); auto = the method's reference")
FILTER_SCOPE = Key(
    "filter_scope", "auto", "when high_entropy / clip_cov select: micro = in every micro-batch of every update "
    "from the current forward (TRL, verl); rollout = once per rollout batch before the first update; auto = "
    "micro for those two, rollout for Clip_B / Clip_V / sign (their references select there)")
TARGET_SHARE = Key("filter_target_share", None,
                   "Clip_B/Clip_V adaptive mu: drop this share of valid tokens each step")
TARGET_DH = Key("filter_target_dh", None, "Clip_B/Clip_V adaptive mu: reach this lr-free predicted entropy "
                "change (mean per valid token)")
MU_CLAMPS = (
    Key("adaptive_mu_min", 0.0, "adaptive mu: lower clamp", arg="mu_min"),
    Key("adaptive_mu_max", 20.0, "adaptive mu: upper clamp", arg="mu_max"),
)


# ---- the methods (Config.entropy_control's values, in its order) ------------------------------

_METHODS = (
    Method("none", "GRPO", "", "plain GRPO", None, ""),
    Method(
        "clip_b", "Clip_B", "Clip_B (arXiv 2602.03392)", "Clip_B, batch-centred discriminator filter",
        FILTER, "Trinity-RFT `clipb_advantage.py`",
        keys=(Key("clip_b_mu", 2.5, "Clip_B threshold in batch standard deviations (released default 2.5)",
                  arg="mu"), FILTER_RULE),
        more_keys=PAPER_BAND,
        fn=losses.clip_b_mask, inputs=("disc", "adv", "mask"),
        adaptive=Adaptive(losses.clip_b_z, ("disc", "mask"), include_zero_adv=False),
        presets=("clip-b", "clip-b-active", "clip-b-adaptive")),
    Method(
        "clip_v", "Clip_V", "Clip_V (arXiv 2602.03392)", "Clip_V, vocabulary-centred discriminator filter",
        FILTER, "Trinity-RFT `clipv_advantage.py`, its cap included",
        keys=(Key("clip_v_mu", 8.5, "Clip_V threshold in standard deviations (released default 8.5)", arg="mu"),
              Key("clip_v_max_frac", 1e-4, "Clip_V released rule: cap on the dropped share (null = no cap)",
                  arg="max_frac"),
              FILTER_RULE),
        more_keys=PAPER_BAND,
        fn=losses.clip_v_mask, inputs=("disc", "baseline", "adv", "mask"),
        adaptive=Adaptive(losses.clip_v_z, ("disc", "baseline", "mask"), include_zero_adv=True),
        presets=("clip-v", "clip-v-active", "clip-v-adaptive")),
    Method(
        "sign", "sign", "sign intervention (the paper's check)", "the paper's sign intervention", FILTER,
        "the paper: sign of S\\* (`s_star`) or of S\\* - E_p[S] (`deviation`)",
        keys=(Key("sign_statistic", "s_star", "sign intervention: the sign of S* (Theorem 3.2, as the paper's "
                  "sources describe the test) or of S* - E_p[S] (deviation, Theorem 3.3)", arg="statistic"),
              Key("sign_deviation", "pos", "sign intervention: keep tokens whose statistic is > 0 (pos) or "
                  "< 0 (neg)", arg="deviation"),
              Key("sign_samples", "all", "sign intervention: only tokens of samples with A > 0 (pos) or "
                  "A < 0 (neg)", arg="samples")),
        fn=losses.sign_mask, inputs=("disc", "baseline", "adv", "mask"),
        presets=("sign-{pos,neg}-s{pos,neg}", "sign-{pos,neg}-dev{pos,neg}")),
    Method(
        "high_entropy", "80/20", 'high-entropy tokens only ("80/20")', "80/20, high-entropy tokens only",
        FILTER, "TRL `top_entropy_quantile`: current forward, linear quantile",
        keys=(Key("high_entropy_rho", 0.2, "high_entropy: keep the top rho fraction of tokens by entropy",
                  arg="rho"),),
        fn=methods.high_entropy_mask, inputs=("entropy", "mask"),
        scopes=(MICRO, ROLLOUT), normalizer=ALL, gather_micro=True, presets=("high-entropy",)),
    Method(
        "clip_cov", "Clip-Cov", "Clip-Cov (Cui et al. 2025)", "Clip-Cov, Cui et al. 2025", FILTER,
        "verl `compute_policy_loss_clip_cov`: current log p, ratio-clipped tokens excluded, >= 1 drawn",
        keys=(Key("cov_frac", 2e-4, "clip_cov: fraction (not percent) of valid tokens detached, drawn from the "
                  "band", arg="frac"),
              Key("cov_lb", 1.0, "clip_cov: lower bound of the covariance band", arg="lb"),
              Key("cov_ub", 5.0, "clip_cov: upper bound of the covariance band", arg="ub")),
        fn=methods.clip_cov_mask, inputs=("logp", "adv", "mask", "generator"),
        extra=MappingProxyType({"exclude": "ratio_clipped"}),
        scopes=(MICRO, ROLLOUT), normalizer=ALL, detach_only=True, presets=("clip-cov",)),
    Method(
        "kl_cov", "KL-Cov", "KL-Cov (Cui et al. 2025)", "KL-Cov, Cui et al. 2025", LOSS,
        "verl `compute_policy_loss_kl_cov`: per micro-batch, no ratio clip",
        keys=(Key("kl_cov_frac", 2e-3, "kl_cov: fraction (not percent; the authors' k=0.2%) of tokens "
                  "penalized", arg="frac"),
              Key("kl_cov_beta", 1.0, "kl_cov: weight of |log p - log p_old| on the selected tokens", arg="beta")),
        fn=methods.kl_cov_loss, inputs=("logp", "old_logp", "adv", "mask"), differentiates=("logp",),
        ignores=("eps_low", "eps_high"), ignores_why="KL-Cov has no ratio clip", presets=("kl-cov",)),
    Method(
        "steer", "STEER", "STEER (arXiv 2510.10150)", "STEER, per-token weights", WEIGHT,
        "its authors' fork: weights after dual clip (the preset sets c = 3, eps_high 0.28)",
        keys=(Key("steer_w_max", 1.2, "steer: weight of the token with the smallest |Omega|", arg="w_max"),
              Key("steer_w_min", 0.8, "steer: weight of the token with the largest |Omega|", arg="w_min")),
        fn=methods.steer_weights, inputs=("logp", "old_logp", "entropy", "adv", "mask"),
        expects=(("dual_clip_c", "STEER's reference applies dual clip (c=3) before weighting; set "
                  "dual_clip_c: 3.0 (--preset steer does)"),),
        presets=("steer",)),
)
METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in _METHODS})


# ---- options: modify one method's rule, or act under any method --------------------------------

ADAPTIVE_MU = Method(
    "adaptive_mu", "adaptive mu", "adaptive mu for Clip_B/Clip_V", "", "the filter's threshold",
    "entclip's own (no reference)", keys=(TARGET_SHARE, TARGET_DH), more_keys=MU_CLAMPS,
    presets=("clip-*-adaptive",), option=True, of=tuple(n for n, m in METHODS.items() if m.adaptive),
    switch=("filter_target_share", "filter_target_dh"))
# The function each switch of ADAPTIVE_MU chooses mu with (the clamps are keywords of both).
ADAPTIVE_MU_FNS: Mapping[str, Callable[..., Any]] = MappingProxyType({
    "filter_target_share": methods.adaptive_mu_for_share, "filter_target_dh": methods.adaptive_mu_for_entropy})
CLIP_HIGHER = Method(
    "clip_higher", "clip-higher", "clip-higher (DAPO)", "", "ratio clip", "DAPO", presets=("clip-higher",),
    option=True, shows=MappingProxyType({"eps_high": 0.28}))
DUAL_CLIP = Method(
    "dual_clip", "dual clip", "dual clip", "", "ratio clip", "verl `clip_ratio_c`",
    keys=(Key("dual_clip_c", None, "dual clip for A < 0: loss <= -c A (e.g. 3.0; null = off)", arg="c"),),
    fn=methods.dual_clip, inputs=("policy_loss", "adv"), differentiates=("policy_loss",),
    option=True, switch=("dual_clip_c",), shows=MappingProxyType({"dual_clip_c": 3.0}))
# The engine applies both: entropy_bonus_term with the current coefficient (entropy_coef, or as the
# adaptive bonus moves it: methods.bonus_coef, adapt_entropy_coef once per optimizer update).
ENTROPY_BONUS = Method(
    "entropy_bonus", "entropy bonus", "entropy bonus", "", LOSS, "TRL `entropy_coef`",
    keys=(Key("entropy_coef", 0.0, "entropy bonus: loss -= coef * mean H over each micro-batch (gradient "
              "through H; as TRL); with entropy_target, the starting coefficient", arg="coef"),),
    fn=methods.entropy_bonus_term, inputs=("entropy", "mask"), differentiates=("entropy",),
    presets=("entropy-bonus",), option=True, switch=("entropy_coef",))
ADAPTIVE_BONUS = Method(
    "adaptive_bonus", "the adaptive bonus", "adaptive entropy bonus", "", "the bonus's coefficient",
    "TRL `use_adaptive_entropy` (Skywork-OR1)",
    keys=(Key("entropy_target", None, "adaptive entropy bonus (Skywork-OR1, as TRL): after each optimizer "
              "update coef rises by entropy_coef_delta while the update's entropy is at or below this target "
              "and falls otherwise; applied only at or below it"),
          Key("entropy_coef_delta", 5e-4, "adaptive entropy bonus: step of coef per optimizer update"),
          Key("entropy_coef_min", 0.0, "adaptive entropy bonus: lower clamp of coef"),
          Key("entropy_coef_max", 0.05, "adaptive entropy bonus: upper clamp of coef")),
    # It measures every update's mean entropy over the bonus's tokens (detached), applied or not, and
    # the engine passes it to methods.adapt_entropy_coef with these keys.
    inputs=("entropy", "mask"), option=True, switch=("entropy_target",))
OPTIONS: tuple[Method, ...] = (ADAPTIVE_MU, CLIP_HIGHER, DUAL_CLIP, ENTROPY_BONUS, ADAPTIVE_BONUS)

# Every key declared here, by name (the Config fields whose default and help come from here).
KEYS: Mapping[str, Key] = MappingProxyType(
    {k.name: k for m in (*_METHODS, *OPTIONS) for k in m.all_keys()})


def filters() -> tuple[str, ...]:
    """The token filters (keep-masks), in entropy_control's order."""
    return tuple(n for n, m in METHODS.items() if m.place == FILTER)


def micro_filters() -> tuple[str, ...]:
    """The filters that may select in every micro-batch of every update."""
    return tuple(n for n, m in METHODS.items() if MICRO in m.scopes)


def method_keys() -> dict[str, tuple[str, ...]]:
    """key -> the methods that read it, for the keys a method's row lists, the filters' common keys
    and the keys that switch an option of some methods on (the inert-setting warnings)."""
    out: dict[str, list[str]] = {}
    for name, m in METHODS.items():
        keys = [*m.keys, *((FILTER_SCOPE, FILTER_NORMALIZER) if m.place == FILTER else ())]
        keys += [k for o in OPTIONS if name in o.of for k in o.keys]
        for k in keys:
            out.setdefault(k.name, []).append(name)
    return {k: tuple(v) for k, v in out.items()}


def method_choices_help() -> str:
    """One line: each entropy_control value with a few words (the CLI's --entropy-control help)."""
    return " | ".join(f"{n} ({m.summary})" for n, m in METHODS.items())


# ---- README's method table -----------------------------------------------------------------

TABLE_HEADER = ("| method | `entropy_control` / keys | place | follows (default behaviour) | preset |\n"
                "|---|---|---|---|---|")


def _place(m: Method) -> str:
    """The place column: a filter's default scope and what its dropped tokens leave (the loss's
    normalizer, KL and entropy bonus, README's `filter_normalizer`)."""
    if m.place != FILTER:
        return m.place or ""
    when = "once per rollout batch" if m.scope == ROLLOUT else "per micro-batch"
    if m.normalizer == KEPT:
        left = "dropped tokens leave everything"
    elif m.detach_only:
        left = "drawn tokens are detached: they leave only the policy term"
    else:
        left = "dropped tokens leave the policy term and the bonus, the normalizer keeps every token"
    return f"{m.place}, {when}; {left}"


def _keys_cell(m: Method) -> str:
    if not m.option:
        return ", ".join([f"`{m.name}`", *(f"`{k.name}`" for k in m.keys)])
    shown = [f"`{k}: {v}`" for k, v in m.shows.items()] or [f"`{k.name}`" for k in m.keys]
    # Keys that each switch the option on alone are alternatives: set one of them.
    alternatives = len(m.switch) > 1 and set(m.switch) == {k.name for k in m.keys}
    return (" or " if alternatives else ", ").join(shown) + ("" if m.of else " (any method)")


def method_table() -> str:
    """README's "Entropy control" table: one row per method (none aside), then the options."""
    rows = [TABLE_HEADER]
    for m in (*(m for m in _METHODS if m.place is not None), *OPTIONS):
        cells = (m.title, _keys_cell(m), _place(m), m.follows, ", ".join(f"`{p}`" for p in m.presets))
        rows.append("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")
    return "\n".join(rows)
