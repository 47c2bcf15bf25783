"""Shared test setup: one thread, an isolated cache, a tiny fast config, slow tests opt-in."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


def _test_seed() -> int:
    raw = os.environ.get("ENTCLIP_TEST_SEED", "0")
    try:
        return int(raw)
    except ValueError:
        raise pytest.UsageError(f"ENTCLIP_TEST_SEED={raw!r}: expected an integer, e.g. ENTCLIP_TEST_SEED=3") from None


# Shifts the seed of every tiny run in the suite (and so its warm start, its prompts and its samples):
# `ENTCLIP_TEST_SEED=3 pytest` runs the suite on other data, as another machine would (one flipped
# token changes a tiny run). Tests must pass for any value: what a test needs it builds (mixed_groups.py).
TEST_SEED = _test_seed()

# Settings that make a full `train` take seconds: a small model, a short warm start, small batches.
# lr, temperature and max_new_tokens are pinned so that a change of the defaults does not move the tests.
TINY = {
    "seed": TEST_SEED, "lr": 1e-4, "temperature": 1.0, "max_new_tokens": 6,
    "max_operand": 19, "n_test": 50,  # 400 problems: a 2-layer model learns some of them in ~2 s
    "tiny_hidden": 64, "tiny_layers": 2, "tiny_heads": 2, "tiny_ffn": 128,
    "warmup_max_steps": 300, "warmup_target_acc": 0.3, "warmup_lr": 3e-3,
    "prompts_per_step": 4, "group_size": 4, "minibatches": 2, "steps": 2,
    "eval_n": 8, "eval_k": 4, "eval_every": 1, "log_every": 1, "accounting_every": 1,
}


def tiny_sets(**overrides) -> list[str]:
    """`--set` arguments for the tiny config, with overrides."""
    return [f"{k}={v}" for k, v in {**TINY, **overrides}.items()]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Warm starts go to a per-session cache, never the user's; shared by all tests of the session."""
    os.environ["ENTCLIP_CACHE"] = str(tmp_path_factory.mktemp("entclip-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # Trackers (report_to) write nowhere outside the session's folders: trackio reads TRACKIO_DIR once,
    # at import; wandb keeps settings and caches in its own folders.
    home = tmp_path_factory.mktemp("trackers")
    os.environ["TRACKIO_DIR"] = str(home / "trackio")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[var] = str(home / var.lower())
    os.environ.pop("WANDB_MODE", None)  # entclip's offline default is what the tests check
    os.environ["WANDB_SILENT"] = "true"
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ENTCLIP_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set ENTCLIP_SLOW=1 or pass -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
