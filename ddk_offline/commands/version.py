"""`ddk-offline version`: print versions of the package and its numerical stack."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("version")
    def version() -> None:
        """Print the versions of ddk-offline, torch, transformers, pyarrow and triton."""
        import importlib.metadata as md

        import ddk_offline

        typer.echo(f"ddk-offline {ddk_offline.__version__}")
        for dist in ("torch", "transformers", "datasets", "pyarrow", "zstandard", "triton"):
            try:
                typer.echo(f"{dist} {md.version(dist)}")
            except md.PackageNotFoundError:
                typer.echo(f"{dist} (not installed)")
