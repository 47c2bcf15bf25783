"""The command line, the top layer: the Typer app (app), run creation for train, sweeps and resume
(runs.start_run), one-line errors and --debug (errors), option help from the config (options), the
commands that read runs (reading), the console's progress (console)."""

from entclip.cli.app import app, main

__all__ = ["app", "main"]
