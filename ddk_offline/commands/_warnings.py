"""Warnings meant for the user (not for a developer): printed as one red ``WARNING:`` line, not Python's format."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import typer


@contextlib.contextmanager
def loud_warnings(*categories: type[Warning]) -> Iterator[None]:
    """Inside the block, warnings of ``categories`` print as a red line on stderr; others keep Python's format."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, categories):
            typer.secho(f"WARNING: {message}", fg=typer.colors.RED, bold=True, err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
