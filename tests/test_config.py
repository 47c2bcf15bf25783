"""Config: precedence, presets, validation messages that name the fix."""

from __future__ import annotations

import typing

import pytest
import yaml

from entclip.contracts.config import Config, inert_settings, load_preset, preset_names, resolve
from entclip.contracts.errors import EntclipError


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    assert cfg.batch_size == 64 and cfg.minibatch_size == 32
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]


def test_precedence_defaults_preset_config_flags_set(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 2.0e-4\nsteps: 11\nseed: 3\ngroup_size: 4\n")
    config = tmp_path / "c.yaml"
    config.write_text("steps: 12\nseed: 4\ngroup_size: 6\n")
    cfg = resolve(preset=str(preset), config_file=str(config), flags={"seed": 5, "group_size": None},
                  sets=["group_size=2"])
    assert cfg.lr == 2e-4        # preset over default
    assert cfg.steps == 12       # config file over preset
    assert cfg.seed == 5         # flag over config file
    assert cfg.group_size == 2   # --set over everything; a None flag does not count


def test_shipped_presets_resolve():
    names = preset_names()
    assert {"clip-b", "clip-v", "clip-b-active", "clip-v-active"} <= set(names)
    for name in names:
        cfg = resolve(preset=name)
        assert cfg.entropy_control in typing.get_args(typing.get_type_hints(type(cfg))["entropy_control"])
    assert resolve(preset="clip-v").clip_v_mu == 8.5 and resolve(preset="clip-v").clip_v_max_frac == 1e-4


def test_set_parses_scientific_notation_bools_and_null():
    cfg = resolve(sets=["lr=1e-5", "scale_std=false", "clip_v_max_frac=null", "eps_high=0.28"])
    assert cfg.lr == 1e-5 and cfg.scale_std is False and cfg.clip_v_max_frac is None
    assert cfg.eps_high == 0.28


def test_saved_config_yaml_resolves_back_to_the_same_config(tmp_path):
    cfg = resolve(preset="clip-v-active", sets=["seed=7"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert resolve(config_file=str(path)) == cfg


@pytest.mark.parametrize("sets, needle", [
    (["grup_size=4"], "did you mean group_size"),
    (["group_size=1"], "set --set group_size=8"),
    (["minibatches=3"], "does not divide"),
    (["lr=abc"], "expected a number"),
    (["lr=-1"], "must be positive"),
    (["steps=1.5"], "expected an integer"),
    (["entropy_control=clip"], "choose one of none, clip_b, clip_v"),
    (["filter_mu_low=1.0"], "filter_rule=paper"),
    (["eps_low=1.5"], "eps_low"),
    (["noequals"], "expected key=value"),
    (["clip_v_max_frac=2"], "clip_v_max_frac"),
    (["entropy_control=clip_b", "filter_scope=micro"], "only high_entropy and clip_cov select per micro-batch"),
    (["entropy_control=clip_cov", "filter_normalizer=kept"], "use filter_normalizer=all"),
    (["entropy_control=high_entropy", "log_filter=true"], "set --set filter_scope=rollout"),
    (["entropy_coef_min=0.1", "entropy_coef_max=0.05"], "lower the min"),
    (["sign_statistic=sstar"], "choose one of s_star, deviation"),
])
def test_bad_values_fail_with_a_message_naming_the_fix(sets, needle):
    with pytest.raises(EntclipError) as err:
        resolve(sets=sets)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(EntclipError, match="choose from .*clip-b"):
        load_preset("clip-z")


def test_malformed_yaml_and_non_mapping_config_fail(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(EntclipError, match="not valid YAML"):
        resolve(config_file=str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(EntclipError, match="mapping"):
        resolve(config_file=str(lst))
    with pytest.raises(EntclipError, match="cannot read"):
        resolve(config_file=str(tmp_path / "missing.yaml"))


def test_none_is_a_valid_run_name_but_null_unsets():
    assert resolve(flags={"name": "none"}).name == "none"  # scripts/readme_runs.sh names a run so
    assert resolve(sets=["name=null"]).name is None
    assert resolve(sets=["dual_clip_c=none"]).dual_clip_c is None


def test_each_method_defaults_to_its_references_normalizer_and_scope():
    expect = {"clip_b": ("kept", "rollout"), "clip_v": ("kept", "rollout"), "sign": ("kept", "rollout"),
              "high_entropy": ("all", "micro"), "clip_cov": ("all", "micro")}
    for method, (normalizer, scope) in expect.items():
        cfg = resolve(sets=[f"entropy_control={method}"])
        assert (cfg.normalizer, cfg.scope) == (normalizer, scope), method
    cfg = resolve(sets=["entropy_control=high_entropy", "filter_scope=rollout", "filter_normalizer=kept"])
    assert (cfg.normalizer, cfg.scope) == ("kept", "rollout")


@pytest.mark.parametrize("sets, needle", [
    (["clip_v_mu=3"], "clip_v_mu=3.0 has no effect with entropy_control=none"),
    (["entropy_control=clip_b", "cov_frac=0.1"], "cov_frac=0.1 has no effect with entropy_control=clip_b"),
    (["entropy_control=clip_b", "clip_b_mu=1", "filter_target_share=0.05"], "filter_target_share chooses mu"),
    (["entropy_control=clip_v", "filter_target_share=0.05"], "clip_v_max_frac=0.0001 is not applied"),
    (["entropy_coef_delta=0.01"], "has no effect without entropy_target"),
    (["entropy_control=kl_cov", "eps_high=0.28"], "KL-Cov has no ratio clip"),
    (["entropy_control=steer"], "STEER's reference applies dual clip"),
    (["loss_agg_constant=8"], "has no effect with loss_agg=token-mean"),
    (["adaptive_mu_max=5"], "have no effect without filter_target_share"),
])
def test_a_setting_that_changes_nothing_gets_one_line(sets, needle):
    lines = inert_settings(resolve(sets=sets))
    assert len(lines) == 1 and needle in lines[0] and "\n" not in lines[0]


def test_shipped_presets_set_nothing_inert():
    for name in preset_names():
        assert inert_settings(resolve(preset=name)) == [], name


def test_sign_presets_cover_both_statistics():
    for stat, tag in (("s_star", "s"), ("deviation", "dev")):
        for a in ("pos", "neg"):
            for d in ("pos", "neg"):
                cfg = resolve(preset=f"sign-{a}-{tag}{d}")
                assert (cfg.sign_statistic, cfg.sign_samples, cfg.sign_deviation) == (stat, a, d)
