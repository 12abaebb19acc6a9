"""`ddk-offline runs compare`: distill runs of one dump side by side (reads run folders, writes only plots)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ddk_offline.commands._console import output_console
from ddk_offline.commands._errors import exit_on_user_error


def register(app: typer.Typer) -> None:
    runs = typer.Typer(help="Inspect and compare distill runs.", no_args_is_help=True)
    app.add_typer(runs, name="runs")

    @runs.command("compare")
    @exit_on_user_error
    def compare(
        paths: list[str] = typer.Argument(..., help="Run folders (the --out of distill), all from one dump."),  # noqa: B008
        as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON instead of tables."),
        plots: Optional[str] = typer.Option(  # noqa: UP045
            None, help="Write compare_ratio.png and compare_weights.png (one panel per run) into this folder."
        ),
    ) -> None:
        """Settings that differ, per-domain student/teacher ratios (mean, worst), steps, tokens and tokens/s."""
        from ddk_offline.distillation.compare import compare_runs, read_run

        result = compare_runs(paths)
        if plots:
            from ddk_offline.distillation.plots import write_compare_plots

            result["plots"] = [str(p) for p in write_compare_plots([read_run(p) for p in paths], plots)]
        if as_json:
            typer.echo(json.dumps(result, indent=2, allow_nan=True))
            return
        _print(result)


def _print(result: dict) -> None:
    from rich.table import Table

    console = output_console()
    runs = result["runs"]
    table = Table(title="runs (one dump)")
    table.add_column("")
    for i, r in enumerate(runs, 1):
        table.add_column(f"[{i}] {r['run']}", justify="right")
    for key in result["settings_that_differ"]:
        table.add_row(key.replace("_", "-"), *[json.dumps(r["settings"][key]) for r in runs])
    table.add_row("steps", *[f"{r['steps']:,}" for r in runs], end_section=False)
    table.add_row("tokens", *[f"{r['tokens']:,}" for r in runs])
    table.add_row("tokens/s", *[f"{r['tokens_per_s']:,.0f}" for r in runs], end_section=True)
    for d in result["domains"]:
        table.add_row(f"ratio {d}", *[_num(r["ratios"].get(d)) for r in runs])
    table.add_row("mean ratio", *[_num(r["mean_ratio"]) for r in runs])
    table.add_row("worst ratio", *[f"{_num(r['worst_ratio'])} ({r['worst_domain']})" for r in runs])
    console.print(table)
    for p in result.get("plots", []):
        console.print(f"plot: {p}")


def _num(x) -> str:
    return "" if x is None else f"{x:.3f}"
