"""Starting runs: `start_run` creates (or, to resume, reopens) a run directory and trains in it. `train`,
a sweep (`train --seeds/--presets`) and `train --resume` all start their runs through it.

Under `accelerate launch` several processes run this code at once (WORLD_SIZE says how many). They take
the main process's run path (a default name holds the time, which they may not share); only the main
process creates, replaces or cleans the run directory and writes config.yaml, while the others wait,
then only read it; and a refusal on the main process (the directory exists) stops every process with
the same line.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from entclip.cli.errors import stderr, warn
from entclip.contracts.errors import FAILED, EntclipError
from entclip.core.registry import FILTER

T = TypeVar("T")


def world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


class Processes:
    """The processes of one launch: one without `accelerate launch`, WORLD_SIZE under it."""

    def __init__(self, cfg):
        self.state = None
        if world_size() > 1:
            import torch
            from accelerate import PartialState

            self.state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())  # as the Trainer's

    @property
    def main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def agree(self, value: T) -> T:
        """The main process's `value`, on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def main_first(self, work: Callable[[], T]) -> Optional[T]:
        """`work()` on the main process while the others wait; its failure is every process's (an
        EntclipError with its line and exit code). Returns work()'s value on the main process, None on
        the others."""
        if self.state is None:
            return work()
        result, error, failure = None, None, None
        if self.main:
            try:
                result = work()
            except Exception as exc:  # the others must not wait for a process that stopped
                error = exc
                failure = ((str(exc), exc.exit_code) if isinstance(exc, EntclipError)
                           else (f"the main process failed: {type(exc).__name__}: {exc}", FAILED))
        failure = self.agree(failure)
        if error is not None:
            raise error
        if failure is not None:
            raise EntclipError(*failure)
        return result


def close_processes() -> None:
    """At the end of a command under `accelerate launch`: tear this process's group down before the
    interpreter exits, so gloo's threads end in order (an un-destroyed group can abort a process at
    exit). Local to the process: no collective, so a process whose peer failed cannot hang here."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def start_run(cfg, path: Path, *, overwrite: bool = False, resume: bool = False,
              quiet: bool = False) -> Optional[dict[str, Any]]:
    """Train `cfg` in the run directory `path`, safe under several processes.

    A new run: the directory is created and config.yaml written first; an existing non-empty one is
    refused (exit 4) unless `overwrite` (which only ever replaces an entclip run). If the run fails
    before its first training step, nothing of it is left. `resume`: the run at `path` continues from
    its latest complete checkpoint, its rows after that checkpoint removed. Returns the summary on the
    main process, None on the others.
    """
    from entclip.cli.console import Progress
    from entclip.contracts.rundir import RunDir, latest_checkpoint

    if cfg.engine == "trl":
        from entclip.training.trl_engine import train_trl as train
    else:
        from entclip.training.loop import train
    procs = Processes(cfg)
    path = Path(procs.agree(str(path)))
    opened = procs.main_first(lambda: _open(cfg, path, overwrite, resume))
    run, ckpt = opened if procs.main else (RunDir(path), latest_checkpoint(path) if resume else None)
    try:
        with Progress(cfg.steps, quiet=quiet or not procs.main, log_every=cfg.log_every) as progress:
            summary = train(cfg, run, log=progress.log if procs.main else _silent, on_step=progress.step,
                            **({"resume_from": ckpt} if cfg.engine == "entclip" else {}))
    except BaseException:
        if not resume:
            _discard_if_empty(run, procs.main)
        raise
    return summary if procs.main else None


def _silent(line: str) -> None:
    pass


def _open(cfg, path: Path, overwrite: bool, resume: bool):
    """(run, checkpoint to resume from): the one place a run directory is made or reopened."""
    from entclip.contracts.rundir import RunDir

    if resume:
        return RunDir.reopen(path)
    run = RunDir.create(path, overwrite=overwrite)
    run.write_config(cfg.to_yaml())
    return run, None


def _discard_if_empty(run, main: bool) -> None:
    """A run that failed before its first training step (a bad field, a model that does not load)
    leaves nothing behind: its fresh directory holds only config.yaml and maybe a first eval."""
    import shutil

    from entclip.contracts.rundir import METRICS

    run.close()
    if main and not (run.path / METRICS).exists() and not (run.path / "checkpoints").exists():
        shutil.rmtree(run.path, ignore_errors=True)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    """RunDir.create's refusals, without creating anything: a sweep checks all its runs before the first."""
    from entclip.contracts.rundir import CONFIG, RunDir

    empty_dir = path.is_dir() and not any(path.iterdir())
    replaceable = overwrite and (path / CONFIG).exists()
    if path.exists() and not empty_dir and not replaceable:
        RunDir.create(path, overwrite=overwrite)  # refuses these cases before it touches anything


# ---- the three ways `train` starts runs ----------------------------------------------------------

def train_one(preset: str | None, config: str | None, flags: dict, sets: list[str], dry_run: bool,
              overwrite: bool, quiet: bool) -> None:
    """`entclip train`: resolve the config, check what can be checked, then start the run."""
    from entclip.contracts.config import resolve

    cfg = resolve(preset=preset, config_file=config, flags=flags, sets=sets)
    check_task(cfg)
    warn_inert(cfg)
    path = run_path(cfg)
    trl_args = check_engine(cfg, path)
    if dry_run:
        typer.echo("# resolved config\n" + cfg.to_yaml() + "# plan\n" + plan(cfg, path))
        if trl_args is not None:
            from entclip.training.trl_engine import describe

            typer.echo("# TRL GRPOConfig (engine trl; docs/trl.md maps every key)\n" + describe(cfg, trl_args))
        dry_run_checks(cfg)
        return
    check_sources(cfg)  # before the run directory exists: nothing is left behind
    summary = start_run(cfg, path, overwrite=overwrite, quiet=quiet)
    if summary is not None:
        report_done(summary, path, quiet)


def sweep(seeds: str | None, presets: str | None, preset: str | None, config: str | None, flags: dict,
          sets: list[str], dry_run: bool, overwrite: bool, quiet: bool) -> None:
    """Every (preset, seed) as its own run directory under one group directory, all checked before
    the first starts."""
    from entclip.contracts.config import resolve

    if preset is not None:
        raise EntclipError("--preset and --presets both given; list every preset in --presets")
    try:
        seed_list = [int(x) for x in _split(seeds, "seeds")] if seeds is not None else [None]
    except ValueError:
        raise EntclipError(f"--seeds {seeds!r}: expected integers like 0,1,2") from None
    if seeds is not None and any(s.split("=", 1)[0].strip() == "seed" for s in sets):
        raise EntclipError("--set seed=... would override every seed of --seeds (the runs would be named for "
                           "seeds they do not use); drop it and list the seeds in --seeds")
    preset_list = _split(presets, "presets") if presets is not None else ["none"]
    base = resolve(config_file=config, flags={**flags, "name": None}, sets=sets)
    procs = Processes(base)
    group = Path(procs.agree(str(Path(base.out_dir) / (flags.get("name")
                                                         or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"))))
    runs, seen = [], set()
    for p in preset_list:
        for seed in seed_list:
            seed = base.seed if seed is None else seed
            label = p if p != "none" else base.entropy_control
            cfg = resolve(preset=None if p == "none" else p, config_file=config,
                          flags={**flags, "seed": seed, "out_dir": str(group), "name": f"{label}-s{seed}"},
                          sets=sets)
            check_task(cfg)
            warn_inert(cfg, seen)
            runs.append(cfg)
    for cfg in runs:  # refuse before any run starts
        check_packages(cfg)
        check_engine(cfg, Path(cfg.out_dir) / cfg.name)
    procs.main_first(lambda: [_refuse_existing(Path(cfg.out_dir) / cfg.name, overwrite) for cfg in runs])
    if dry_run:
        typer.echo(f"# sweep: {len(runs)} runs under {group}")
        for cfg in runs:
            typer.echo(f"{cfg.name}: entropy_control={cfg.entropy_control} seed={cfg.seed}")
        return
    for i, cfg in enumerate(runs, 1):
        path = Path(cfg.out_dir) / cfg.name
        if procs.main and not quiet:
            typer.echo(f"[{i}/{len(runs)}] {path}")
        start_run(cfg, path, overwrite=overwrite, quiet=quiet)
    if procs.main:
        typer.echo(str(group) if quiet else f"sweep done: {group}  (entclip compare {group})")


def resume(path: Path, quiet: bool, given: dict[str, Any]) -> None:
    """`entclip train --resume RUN`: the run continues with its own config.yaml, so no other option
    may be `given` (name -> value, None when not given)."""
    from entclip.contracts.config import resolve
    from entclip.contracts.rundir import CONFIG, RunDir, checkpoint_step, latest_checkpoint

    named = [k for k, v in given.items() if v is not None and v is not False]
    if named:
        raise EntclipError(f"--resume continues a run with its own config.yaml; drop --{named[0].replace('_', '-')}")
    if not (path / CONFIG).exists():
        RunDir.reopen(path)  # refuses it (no such directory, or not a run directory) before touching anything
    cfg = resolve(config_file=str(path / CONFIG))
    if cfg.engine == "trl":
        raise EntclipError(f"--resume {path}: an engine trl run keeps TRL's checkpoints in {path / 'trl'}, which "
                           "entclip does not resume; start a new run (with save_every for TRL checkpoints)")
    check_packages(cfg)  # before reopen trims the run's files
    ckpt = latest_checkpoint(path)
    if ckpt is not None and checkpoint_step(ckpt) >= cfg.steps:
        raise EntclipError(f"--resume {path}: the run already finished its {cfg.steps} steps; "
                           "start a new run to train further")
    summary = start_run(cfg, path, resume=True, quiet=quiet)
    if summary is not None:
        report_done(summary, path, quiet)


def print_config_keys() -> None:
    """`entclip train --help-config`: every config key, its default and its help."""
    from entclip.contracts.config import describe_fields

    for key, default, text in describe_fields():
        typer.echo(f"{key} = {default}\n    {text}")


# ---- checks before a run directory exists -----------------------------------------------------

def check_task(cfg) -> None:
    """Validate the task's settings before anything is written."""
    from entclip.data.rewards import parse_spec
    from entclip.data.tasks import builtin_reward, builtin_task

    if not cfg.dataset:
        builtin_task(cfg)  # its settings: one line naming the fix, before a run directory exists
    parse_spec(cfg.reward, "math" if cfg.dataset else builtin_reward(cfg))  # names known, custom functions importable


def warn_inert(cfg, seen: set[str] | None = None) -> None:
    """Print each setting that changes nothing in `cfg` (config.inert_settings), once."""
    from entclip.contracts.config import inert_settings

    for line in inert_settings(cfg):
        if seen is None or line not in seen:
            warn(line)
            if seen is not None:
                seen.add(line)


def check_sources(cfg) -> None:
    """A tracker package that is missing, a Hugging Face model or dataset that cannot be read stop
    here, one line each."""
    check_packages(cfg)
    if cfg.model == "tiny" and not cfg.dataset:
        return
    from entclip.contracts.errors import NOT_FOUND
    from entclip.training.plan import offline_if_unreachable, reachability

    offline_if_unreachable()
    problems = reachability(cfg)
    if problems:
        for line in problems[:-1]:
            stderr().print(f"[red]error:[/red] {line}", soft_wrap=True)
        raise EntclipError(problems[-1], NOT_FOUND)


def check_packages(cfg) -> None:
    """The optional packages the config needs (tracker extras, peft for LoRA): one line naming the extra."""
    from entclip.training.trackers import check_installed

    check_installed(cfg.report_to)
    if cfg.sampler == "vllm":  # both engines: TRL's colocated vLLM needs the package too
        from entclip.training.vllm_sampler import require_vllm

        require_vllm()
    if cfg.lora_r > 0:
        from entclip.data.models import require_peft

        require_peft()


def check_engine(cfg, path: Path):
    """engine trl: its refusals before anything is written (trl_engine.check); the GRPOConfig, or None."""
    if cfg.engine != "trl":
        return None
    from entclip.training.trl_engine import check

    return check(cfg, world_size(), str(path / "trl"))


def dry_run_checks(cfg) -> None:
    """For a Hugging Face model or dataset: can everything be reached, and what memory it needs."""
    check_packages(cfg)  # any model: the run would stop here
    if cfg.model == "tiny" and not cfg.dataset:
        return
    from entclip.training.memory import memory_estimate, render_memory
    from entclip.training.plan import model_config

    if cfg.model != "tiny":
        try:
            est = memory_estimate(cfg, model_config(cfg), world_size())
            typer.echo("# memory estimate per GPU\n" + "\n".join(render_memory(est)))
        except EntclipError:
            typer.echo("# memory estimate per GPU\nneeds the model's config, which cannot be read (below)")
    check_sources(cfg)
    typer.echo("# checks\nmodel, dataset and eval sets are reachable")


def _split(text: str | None, what: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not items:
        raise EntclipError(f"--{what} {text!r}: give a comma-separated list")
    return items


# ---- what a run prints ------------------------------------------------------------------------

def run_path(cfg) -> Path:
    name = cfg.name or f"{cfg.entropy_control}-s{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.out_dir) / name


def plan(cfg, path: Path) -> str:
    """The dry run's plan: what the run would do, in one screen."""
    updates = cfg.epochs * cfg.minibatches
    method = cfg.method  # its declared keys with their values (entclip/core/registry.py)
    filt = method.name
    if method.place is not None:
        filt += f": {method.place}, " + ", ".join(f"{k.name}={getattr(cfg, k.name)}" for k in method.keys)
        if method.place == FILTER:
            filt += f", scope {cfg.scope}, normalizer {cfg.normalizer}"
    if cfg.dataset:
        task = (f"dataset {cfg.dataset}" + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
                + f", split {cfg.dataset_split}, fields {cfg.prompt_field} / {cfg.answer_field}, prompts "
                f"<= {cfg.max_prompt_tokens} tokens, chat template {cfg.chat_template}")
        evals = ", ".join(e["name"] for e in cfg.eval_sets) or "none"
    else:
        task = (f"{cfg.task} (operands 0..{cfg.max_operand}, {cfg.n_test} held out)" if cfg.task == "arithmetic"
                else f"{cfg.task} ({cfg.countdown_numbers} numbers from 1..{cfg.countdown_max_number}, targets "
                f"1..{cfg.countdown_max_target}, {cfg.n_test} held out)")
        evals = f"{cfg.eval_n} held-out problems"
    if cfg.model == "tiny":
        model = (f"tiny (hidden {cfg.tiny_hidden}, {cfg.tiny_layers} layers), supervised warm start to "
                 f"{cfg.warmup_target_acc:.0%} greedy accuracy (cached)")
    else:
        from entclip.training.plan import resolve_precision

        model = (f"{cfg.model} ({resolve_precision(cfg)}"
                 + (", gradient checkpointing" if cfg.gradient_checkpointing else "")
                 + (", trust_remote_code" if cfg.trust_remote_code else "") + ")")
    return "\n".join([
        f"run directory : {path}",
        f"task          : {task}",
        f"model         : {model}",
        f"reward        : {cfg.reward} (timeout {cfg.reward_timeout} s)",
        f"steps         : {cfg.steps} x {cfg.prompts_per_step} prompts x {cfg.group_size} samples "
        f"= {cfg.batch_size} sequences/step; {updates} update(s)/step of {cfg.minibatch_size}, "
        f"{cfg.steps * updates} updates in all",
        f"objective     : clipped surrogate eps {cfg.eps_low}/{cfg.eps_high}, {cfg.loss_agg}, "
        f"kl_coef {cfg.kl_coef}, lr {cfg.lr} ({cfg.lr_schedule})",
        f"method        : {filt}",
        f"evaluation    : every {cfg.eval_every or cfg.steps} steps on {evals}, "
        f"greedy + avg@{cfg.eval_k}/pass@k at T={cfg.eval_temperature}",
    ])


def report_done(summary: dict, path: Path, quiet: bool) -> None:
    if quiet:
        typer.echo(str(path))
        return
    from entclip.contracts.rundir import eval_set_names

    f, ev0, ev = summary["final"], summary["eval_first"] or {}, summary["eval_last"] or {}
    main = (eval_set_names(ev) or ["test"])[0]
    ws = summary.get("warm_start") or {}
    warm = ""
    if "cached" in ws:  # the built-in model: say what the warm start cost (the summary's wall excludes it)
        warm = " after a cached warm start" if ws["cached"] else f" after a {ws['seconds']:.0f} s warm start"
    typer.echo(f"done in {summary['wall_s']:.1f} s{warm}: entropy {summary['entropy']['first']:.3f} -> "
               f"{summary['entropy']['last']:.3f}, reward {f['reward/mean']:.3f}, greedy accuracy on "
               f"{main} {ev0.get(main + '/greedy_acc', float('nan')):.3f} -> "
               f"{ev.get(main + '/greedy_acc', float('nan')):.3f}, filter share {f['clip/filter_frac']:.4f}")
    typer.echo(f"run directory: {path}  (entclip analyze {path})")
