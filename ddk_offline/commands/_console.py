"""The rich console for command output: the terminal's width, or 200 columns when output goes to a file."""

from __future__ import annotations

import sys


def output_console():
    """A rich ``Console`` for stdout that never cuts tables to 80 columns in a log file (nohup, Slurm)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)
