"""`ddk-offline eval`: per-domain val loss of one or more models against the teacher's stored loss."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ddk_offline.commands._console import output_console
from ddk_offline.commands._errors import exit_on_user_error
from ddk_offline.commands._quiet import quiet_libraries

# ruff: noqa: UP045 - typer needs Optional on 3.10


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @exit_on_user_error
    def eval_(
        dump: str = typer.Option(..., help="Teacher dump directory (its val shards and stored teacher loss)."),
        model: list[str] = typer.Option(  # noqa: B008 - typer declares options in defaults
            ..., help="Model to evaluate (save_pretrained folder or .gguf); repeatable."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON (a list, one object per --model)."),
        batch_size: int = typer.Option(8, help="Sequences per forward."),
        device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda | cuda:N."),
        max_sequences: Optional[int] = typer.Option(None, help="Val sequences per domain (default: all)."),
        split: str = typer.Option("val", help="Dump split to evaluate on: val | train."),
        data_workers: Optional[int] = typer.Option(
            None, help="Processes decoding the dump's rows (default: the spare cores; 0: a thread). Same numbers."
        ),
    ) -> None:
        """Per-domain loss, perplexity and student/teacher ratio; mean and worst-domain ratio per model."""
        from ddk_offline.distillation.evaluation import evaluate
        from ddk_offline.errors import UserError

        if split not in ("val", "train"):
            raise UserError(f"--split {split!r}: choose val or train")
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        if max_sequences is not None and max_sequences < 1:
            raise UserError(f"--max-sequences must be >= 1 (or left out for all), got {max_sequences}")
        if data_workers is not None and data_workers < 0:
            raise UserError(f"--data-workers must be >= 0 (or left out for automatic), got {data_workers}")
        quiet_libraries()
        results = evaluate(
            dump,
            model,
            split=split,
            batch_size=batch_size,
            device=device,
            max_sequences=max_sequences,
            data_workers=data_workers,
            say=lambda line: typer.echo(f"{line} ...", err=True),  # stderr: --json output stays clean
        )
        payload = [r.to_dict() for r in results]
        if as_json:
            typer.echo(json.dumps(payload, indent=2, allow_nan=True))  # a list, one object per --model, always
            return
        _print_tables(payload)


def _print_tables(payload: list[dict]) -> None:
    from rich.table import Table

    console = output_console()
    for r in payload:
        table = Table(title=f"{r['model']} ({r['split']})")
        cols = ("domain", "sequences", "loss", "ppl", "teacher loss", "teacher ppl", "ppl ratio", "bpb", "teacher bpb")
        for col in cols:
            table.add_column(col, justify="left" if col == "domain" else "right")
        for name, d in r["domains"].items():
            if not d["positions"]:
                table.add_row(name, "0", *[""] * (len(cols) - 2))
                continue
            table.add_row(
                name,
                str(d["sequences"]),
                f"{d['loss']:.4f}",
                f"{d['ppl']:.2f}",
                f"{d['teacher_loss']:.4f}",
                f"{d['teacher_ppl']:.2f}",
                f"{d['ratio']:.3f}",
                f"{d['student_bpb']:.4f}",
                f"{d['teacher_bpb']:.4f}",
            )
        console.print(table)
        console.print(f"mean ratio {r['mean_ratio']:.3f}, worst {r['worst_ratio']:.3f} ({r['worst_domain']})")
    if len(payload) > 1:
        console.print(side_by_side(payload))


def side_by_side(payload: list[dict]):
    """One table of student/teacher perplexity ratios: domains x models, then the mean and the worst domain."""
    from rich.table import Table

    table = Table(title=f"ppl ratio vs the teacher ({payload[0]['split']}; lower is better)")
    table.add_column("domain")
    for i, r in enumerate(payload, 1):
        table.add_column(f"[{i}] {r['model']}", justify="right")
    for name in payload[0]["domains"]:
        cells = [r["domains"].get(name, {}) for r in payload]
        table.add_row(name, *[f"{d['ratio']:.3f}" if d.get("positions") else "" for d in cells])
    table.add_row("mean", *[f"{r['mean_ratio']:.3f}" for r in payload], end_section=False)
    table.add_row("worst", *[f"{r['worst_ratio']:.3f} ({r['worst_domain']})" for r in payload])
    return table
