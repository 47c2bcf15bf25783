"""The command line: the Typer app (app) and its console output (console). The top layer."""

from entclip.cli.app import app, main

__all__ = ["app", "main"]
