"""The `ddk-offline` command line. Commands are thin: parse, validate, call one library function.

Each command group lives in its own module under ``ddk_offline/commands`` and registers itself here.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ddk-offline",
    help="Offline, domain-aware knowledge distillation (DDK) of LLMs from precomputed teacher logits.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Offline, domain-aware knowledge distillation (DDK) of LLMs from precomputed teacher logits."""


def _register() -> None:
    from ddk_offline.commands import COMMAND_MODULES

    for module in COMMAND_MODULES:
        module.register(app)


def main() -> None:
    """Console-script entry point."""
    _register()
    app()
