"""The method registry (entclip/core/registry.py) is the one declaration of every method: the config,
the objective and README's table read it, and each declaration fits the function it names."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import inspect
import itertools
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from entclip.contracts import config
from entclip.contracts.config import Config, preset_names, resolve
from entclip.core import losses, registry
from entclip.training import objective

ROOT = Path(__file__).resolve().parents[1]
PARTS = (*registry.METHODS.values(), *registry.OPTIONS)
ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0)


def _script():
    spec = importlib.util.spec_from_file_location("method_table", ROOT / "scripts" / "method_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_method_table_is_the_generated_one():
    text = (ROOT / "README.md").read_text()
    assert _script().readme_table(text) == registry.method_table(), (
        "README.md's method table differs from the registry's: run python scripts/method_table.py --write")


def test_entropy_control_choices_are_the_registered_methods():
    hint = typing.get_type_hints(Config)["entropy_control"]
    assert typing.get_args(hint) == tuple(registry.METHODS)
    help_line = registry.method_choices_help()
    assert "\n" not in help_line and all(f"{name} (" in help_line for name in registry.METHODS)
    assert config.FIELDS["entropy_control"].metadata["help"].endswith(help_line)


def test_method_keys_are_config_fields_with_the_declared_default_and_help():
    for name, key in registry.KEYS.items():
        f = config.FIELDS[name]
        assert (f.default, f.metadata["help"]) == (key.default, key.help), name
    for part in PARTS:  # a key declared twice must be the same declaration
        for key in part.all_keys():
            assert registry.KEYS[key.name] is key, (part.name, key.name)


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.name)
def test_a_declaration_fits_its_function(part):
    statistics = (*part.inputs, *part.extra.values())
    assert set(statistics) <= set(registry.STATISTICS), part.name
    assert set(part.differentiates) <= set(statistics), part.name
    args = [k.arg for k in part.all_keys() if k.arg is not None]
    if part is registry.ADAPTIVE_MU:  # one function per switch, the clamps keywords of each
        assert set(registry.ADAPTIVE_MU_FNS) == set(part.switch)
        for fn in registry.ADAPTIVE_MU_FNS.values():
            assert set(args) <= set(inspect.signature(fn).parameters), fn.__name__
        return
    if part.fn is None:
        assert not args and not part.extra, part.name
        return
    params = inspect.signature(part.fn).parameters
    positional = [p for p, v in params.items() if v.kind is v.POSITIONAL_OR_KEYWORD]
    assert len(positional) >= len(part.inputs), part.name
    taken = set(positional[:len(part.inputs)])
    required = {p for p in positional if params[p].default is inspect.Parameter.empty}
    assert required <= taken | set(args) | set(part.extra), f"{part.name}: {required} not all supplied"
    for arg in (*args, *part.extra):
        assert arg in params and arg not in taken, (part.name, arg)
    assert len(set(args)) == len(args), part.name


def test_filters_scopes_and_normalizers_come_from_the_declarations():
    assert config.FILTERS == ("clip_b", "clip_v", "sign", "high_entropy", "clip_cov")
    assert config.MICRO_FILTERS == ("high_entropy", "clip_cov")
    for name, method in registry.METHODS.items():
        cfg = resolve(sets=[f"entropy_control={name}"])
        assert (cfg.scope, cfg.normalizer) == (method.scope, method.normalizer), name
        assert cfg.method is method


def test_method_keys_map_each_key_to_the_methods_that_read_it():
    # As the hand-written table stood before the registry (its order aside).
    before = {
        "clip_b_mu": ("clip_b",), "clip_v_mu": ("clip_v",), "clip_v_max_frac": ("clip_v",),
        "filter_rule": ("clip_b", "clip_v"), "filter_target_share": ("clip_b", "clip_v"),
        "filter_target_dh": ("clip_b", "clip_v"), "filter_normalizer": config.FILTERS,
        "filter_scope": config.FILTERS, "high_entropy_rho": ("high_entropy",), "cov_frac": ("clip_cov",),
        "cov_lb": ("clip_cov",), "cov_ub": ("clip_cov",), "kl_cov_frac": ("kl_cov",), "kl_cov_beta": ("kl_cov",),
        "steer_w_max": ("steer",), "steer_w_min": ("steer",), "sign_statistic": ("sign",),
        "sign_deviation": ("sign",), "sign_samples": ("sign",),
    }
    assert config.METHOD_KEYS == before
    assert list(config.METHOD_KEYS) == sorted(config.METHOD_KEYS, key=list(config.FIELDS).index)


def _expand(pattern: str) -> list[str]:
    """A preset pattern as README writes it: {a,b} alternatives and * globs."""
    head, brace, rest = pattern.partition("{")
    if not brace:
        return fnmatch.filter(preset_names(), pattern)
    alts, _, tail = rest.partition("}")
    return [p for a in alts.split(",") for p in _expand(head + a + tail)]


@pytest.mark.parametrize("part", [p for p in PARTS if p.presets], ids=lambda p: p.name)
def test_declared_presets_exist_and_select_their_method(part):
    for pattern in part.presets:
        names = _expand(pattern)
        assert names, f"{part.name}: no preset matches {pattern}"
        for name in names:
            cfg = resolve(preset=name)
            if not part.option:
                assert cfg.entropy_control == part.name, name
                continue
            if part.of:
                assert cfg.entropy_control in part.of, name
            on = [k for k in (*part.switch, *part.shows) if getattr(cfg, k) != config.FIELDS[k].default]
            assert on, f"preset {name} does not turn {part.name} on"


def _engine_rule(cfg: Config) -> bool:
    """The condition the engine hard-coded before the registry."""
    return (cfg.entropy_target is not None or cfg.entropy_control == "steer"
            or (cfg.scope == "micro" and cfg.entropy_control == "high_entropy"))


def test_update_reads_entropy_follows_the_declarations():
    for name, scope, target, coef, dual in itertools.product(
            registry.METHODS, ("auto", "rollout", "micro"), ("null", "0.5"), ("0", "0.01"), ("null", "3.0")):
        if scope == "micro" and name not in config.MICRO_FILTERS:
            continue
        cfg = resolve(sets=[f"entropy_control={name}", f"filter_scope={scope}", f"entropy_target={target}",
                            f"entropy_coef={coef}", f"dual_clip_c={dual}"])
        assert objective.update_reads_entropy(cfg) == _engine_rule(cfg), (name, scope, target, coef, dual)


# ---- a method's own key reaches its function as its keyword ----------------------------------

def _batch(seed: int = 0, B: int = 8, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    stats = SimpleNamespace(disc=torch.randn(B, T, generator=g), baseline=0.3 * torch.randn(B, T, generator=g),
                            entropy=torch.rand(B, T, generator=g), old_logp=-2 * torch.rand(B, T, generator=g),
                            ref_logp=None)
    return stats, adv, mask


def _spy(monkeypatch, name: str) -> list[dict]:
    """Wrap the registered function of method `name`; returns the keyword arguments of each call."""
    calls: list[dict] = []
    method = registry.METHODS[name]

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return method.fn(*args, **kwargs)

    patched = {**registry.METHODS, name: dataclasses.replace(method, fn=spy)}
    monkeypatch.setattr(registry, "METHODS", patched)
    return calls


def _run_method(cfg: Config):
    stats, adv, mask = _batch()
    keep, _ = objective.batch_filter(cfg, ONE_PROCESS, stats, adv, mask, torch.Generator().manual_seed(1))
    logp = (stats.old_logp + 0.2).requires_grad_()
    if cfg.scope == "micro":
        keep = objective.micro_filter(cfg, ONE_PROCESS, logp, stats.entropy, stats.old_logp, adv, mask,
                                      torch.Generator().manual_seed(2))
    objective.token_terms(cfg, logp, stats.old_logp, adv, None, stats.entropy, mask, keep)


@pytest.mark.parametrize("sets", [
    ["entropy_control=clip_b", "clip_b_mu=0.7", "filter_rule=paper", "filter_mu_high=0.9"],
    ["entropy_control=clip_v", "clip_v_mu=0.7", "clip_v_max_frac=0.05"],
    ["entropy_control=sign", "sign_statistic=deviation", "sign_deviation=neg", "sign_samples=pos"],
    ["entropy_control=high_entropy", "high_entropy_rho=0.4"],
    ["entropy_control=high_entropy", "high_entropy_rho=0.4", "filter_scope=rollout"],
    ["entropy_control=clip_cov", "cov_frac=0.1", "cov_lb=-50", "cov_ub=50"],
    ["entropy_control=clip_cov", "cov_frac=0.1", "cov_lb=-50", "cov_ub=50", "filter_scope=rollout"],
    ["entropy_control=kl_cov", "kl_cov_frac=0.1", "kl_cov_beta=0.5"],
    ["entropy_control=steer", "steer_w_max=1.5", "steer_w_min=0.5", "dual_clip_c=3.0"],
], ids=lambda s: "-".join(x.split("=")[1] for x in s[:1] + s[-1:]))
def test_each_method_key_reaches_its_function_in_one_look_up(monkeypatch, sets):
    cfg = resolve(sets=sets)
    calls = _spy(monkeypatch, cfg.entropy_control)
    _run_method(cfg)
    declared = {k.arg: getattr(cfg, k.name) for k in cfg.method.all_keys() if k.arg is not None}
    assert calls and all(c.items() >= declared.items() for c in calls), (calls, declared)


def test_clip_v_mu_is_the_threshold_clip_v_mask_compares_with():
    cfg = resolve(sets=["entropy_control=clip_v", "clip_v_mu=0.7", "clip_v_max_frac=null"])
    stats, adv, mask = _batch(3)
    keep, out = objective.batch_filter(cfg, ONE_PROCESS, stats, adv, mask, torch.Generator())
    assert torch.equal(keep, losses.clip_v_mask(stats.disc, stats.baseline, adv, mask, mu=0.7, max_frac=None))
    assert out["clip/mu"] == 0.7 and out["clip/filter_frac"] > 0


def test_the_adaptive_option_replaces_mu_and_the_cap():
    cfg = resolve(sets=["entropy_control=clip_v", "filter_target_share=0.1"])
    assert cfg.clip_v_max_frac is not None  # the cap is set, and not applied
    stats, adv, mask = _batch(4)
    keep, out = objective.batch_filter(cfg, ONE_PROCESS, stats, adv, mask, torch.Generator())
    expect = losses.clip_v_mask(stats.disc, stats.baseline, adv, mask, mu=out["clip/mu"], max_frac=None)
    assert torch.equal(keep, expect) and out["clip/mu"] != cfg.clip_v_mu
