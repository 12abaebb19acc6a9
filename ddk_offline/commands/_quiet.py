"""Silence the libraries' own console output in CLI commands that draw their own progress and tables."""

from __future__ import annotations


def quiet_libraries() -> None:
    """transformers' per-file progress bars and warnings would interleave with our progress bars and tables."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
