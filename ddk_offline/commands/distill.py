"""`ddk-offline distill`: phase two. Parses options into a DistillConfig and calls distillation.trainer.distill."""

from __future__ import annotations

from typing import Optional

import typer

from ddk_offline.commands._console import output_console
from ddk_offline.commands._errors import exit_on_user_error
from ddk_offline.commands._quiet import quiet_libraries

# typer needs Optional[...] (not X | None) on Python 3.10.
# ruff: noqa: UP045


def register(app: typer.Typer) -> None:
    # Defaults are spelled out for --help; tests/test_distill_cli.py checks they equal DistillConfig's.
    @app.command("distill")
    @exit_on_user_error
    def distill(
        ctx: typer.Context,
        dump: Optional[str] = typer.Option(None, help="Teacher dump directory (from `ddk-offline dump-teacher`)."),
        out: Optional[str] = typer.Option(None, help="Output directory: final/ model, metrics.jsonl, checkpoints/."),
        config_file: Optional[str] = typer.Option(
            None,
            "--config",
            help="YAML/JSON file of options (keys = option names); options given here override it. A run's "
            "OUT/config.json is one.",
        ),
        student: Optional[str] = typer.Option(None, help="Student checkpoint: a save_pretrained folder or .gguf."),
        student_config: Optional[str] = typer.Option(None, help="Student config JSON (random init)."),
        derive_from_teacher: Optional[str] = typer.Option(
            None,
            help="Derive the student from the teacher (its weights), e.g. 'layers=8,hidden=384' or 'drop=12-19'.",
        ),
        teacher: Optional[str] = typer.Option(None, help="Teacher path for derive (default: the dump's manifest)."),
        sampler: str = typer.Option(
            "ddk", help="Domain sampler: ddk | doremi[:eta=1,c=0.001] | uniform | proportional | fixed:a=0.5,b=0.5."
        ),
        ddk_interval: Optional[int] = typer.Option(
            None, help="K: steps between sampler updates (default max(1, max_steps // 20))."
        ),
        ddk_alpha: float = typer.Option(0.5, help="DDK smoothing: each domain keeps >= (1 - alpha) / N of the data."),
        ddk_signal: str = typer.Option(
            "ppl-ratio", help="Gap signal: ppl-ratio (paper; pretrained students) | loss-ratio (fresh students)."
        ),
        gap_source: str = typer.Option("train", help="Domain gaps from train batches | val shards every K steps."),
        draw: str = typer.Option("quota", help="Batch domain mix: quota (exact, carried remainders) | sample."),
        ce_weight: float = typer.Option(1.0, help="Weight of the cross-entropy term."),
        kd_weight: float = typer.Option(0.2, help="Weight gamma of the KL term (0: plain CE training, no KL)."),
        temperature: float = typer.Option(1.0, help="KD temperature T (the KL is scaled by T^2)."),
        kd_mode: str = typer.Option("renorm", help="Teacher target: renorm (top-k renormalised) | tail (exact)."),
        max_steps: Optional[int] = typer.Option(None, help="Optimiser steps (default 1000)."),
        max_tokens: Optional[int] = typer.Option(
            None, help="Train tokens instead of --max-steps (all processes together; rounded up)."
        ),
        batch_size: int = typer.Option(8, help="Sequences per micro-batch (per process under torchrun)."),
        grad_accum: int = typer.Option(1, help="Micro-batches per optimiser step."),
        lr: float = typer.Option(3e-4, help="Peak learning rate (AdamW; warm-up then cosine to 10%)."),
        warmup_steps: Optional[int] = typer.Option(None, help="Warm-up steps (default 5% of the steps)."),
        weight_decay: float = typer.Option(0.1, help="AdamW weight decay (not on biases and norms)."),
        grad_clip: float = typer.Option(1.0, help="Max gradient norm (0: no clipping)."),
        eval_every: int = typer.Option(0, help="Evaluate on the val shards every N steps (0: only at the end)."),
        eval_max_sequences: Optional[int] = typer.Option(None, help="Val sequences per domain per evaluation."),
        save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (default 10% of the run)."),
        seed: int = typer.Option(0, help="Seed for init, shuffling and domain draws."),
        device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda | cuda:N."),
        resume: bool = typer.Option(False, help="Continue the run in --out from its latest checkpoint."),
        log_every: int = typer.Option(10, help="A metrics.jsonl row every N steps (plus the first and last)."),
        extend: bool = typer.Option(
            False,
            help="With --resume: train the run on to a larger --max-steps/--max-tokens (the LR schedule is "
            "recomputed for the new length).",
        ),
        report_to: str = typer.Option(
            "auto", help="Experiment loggers: auto (TensorBoard if installed) | none | tensorboard,wandb (a list)."
        ),
        data_workers: Optional[int] = typer.Option(
            None, help="Processes decoding the dump's rows (default: the spare cores; 0: a thread). Same batches."
        ),
        cross_tokenizer: Optional[str] = typer.Option(
            None,
            help="A student with its own tokenizer: the KD method, exact-map (teacher ids with the same bytes) | "
            "uld (sorted-probability distance) | dskd (dual-space KD with cross-model attention; needs the dump's "
            "teacher matrices, and its hidden states for the t2s half). The dump's rows are re-tokenised once and "
            "aligned byte for byte.",
        ),
        student_tokenizer: Optional[str] = typer.Option(
            None, help="With --cross-tokenizer: the student's tokenizer (folder or .gguf; default: --student's)."
        ),
        student_rows: Optional[str] = typer.Option(
            None,
            help="With --cross-tokenizer: cache folder of the aligned student rows (default: DUMP/student_rows when "
            "writable, else OUT/student_rows).",
        ),
        loss_impl: str = typer.Option(
            "auto",
            help="How the loss reaches the student's output: fused-linear (from the final hidden states and the "
            "head's weight; the N x V logits never exist) | logits | auto (fused-linear for a plain linear head).",
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table."),
    ) -> None:
        """Distil a student from a teacher dump with DDK domain sampling (or a baseline sampler).

        Under `torchrun --nproc_per_node N -m ddk_offline distill ...` the student trains with DDP; --batch-size is
        per process.
        """
        from dataclasses import fields

        from ddk_offline.commands._configfile import merged_settings
        from ddk_offline.distillation.config import DistillConfig
        from ddk_offline.distillation.trainer import distill as run

        names = {f.name for f in fields(DistillConfig)}
        settings = merged_settings(
            ctx, DistillConfig, {k: v for k, v in ctx.params.items() if k in names}, config_file, ("dump", "out")
        )
        config = DistillConfig(**settings)
        quiet_libraries()
        from ddk_offline.runtime.distributed import env_rank

        if quiet or env_rank() != 0:  # under torchrun only rank 0 shows progress and the summary
            summary = run(config)
            if env_rank() == 0:
                typer.echo(f"final model: {summary.final_model}")
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from ddk_offline.commands._warnings import loud_warnings
        from ddk_offline.distillation.guards import SamplerSaturationWarning

        with (
            loud_warnings(SamplerSaturationWarning),
            Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar,
        ):
            task = bar.add_task("steps", total=None)

            def say(line: str) -> None:  # above the bar in a terminal; plain lines in a log file
                bar.console.print(line, soft_wrap=True, highlight=False)

            summary = run(
                config,
                progress=lambda step, total: bar.update(task, completed=step, total=total),
                say=lambda message: say(f"{message} ..."),
                on_log=lambda row: say(row_line(row)),
            )
        print_summary(output_console(), summary)


def row_line(row: dict) -> str:
    """One metrics row as the periodic log line: step, loss terms, lr, throughput and the domain mix."""
    parts = [f"step {row['step'] + 1}", f"loss {row['loss']:.4f}", f"ce {row['ce']:.4f}"]
    if row.get("kl") is not None:
        parts.append(f"kl {row['kl']:.4f}")
    if row.get("mapped_mass") is not None:  # --cross-tokenizer exact-map: teacher top-k mass with a student id
        parts.append(f"mapped {row['mapped_mass']:.1%}")
    parts.append(f"lr {row['lr']:.2e}")
    if row.get("tokens_per_s"):
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    weights = " ".join(f"{d}={w:.3f}" for d, w in row["weights"].items())
    return " | ".join(parts) + f" | weights {weights}"


def print_summary(console, summary) -> None:
    """The end-of-run table: per-domain weight and (if evaluated) val loss vs the teacher's."""
    from rich.table import Table

    table = Table(title=f"distill: {summary.steps} steps, {summary.tokens:,} tokens, {summary.tokens_per_s:,.0f} tok/s")
    for col in ("domain", "weight", "val loss", "teacher loss", "ppl ratio"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    evals = (summary.eval or {}).get("domains", {})
    for domain, w in summary.weights.items():
        e = evals.get(domain)
        cells = ["", "", ""]
        if e and e["positions"]:
            cells = [f"{e['loss']:.4f}", f"{e['teacher_loss']:.4f}", f"{e['ratio']:.3f}"]
        table.add_row(domain, f"{w:.3f}", *cells)
    console.print(table)
    if summary.eval:
        console.print(
            f"mean ratio {summary.eval['mean_ratio']:.3f}, worst {summary.eval['worst_ratio']:.3f} "
            f"({summary.eval['worst_domain']})"
        )
    console.print(f"final model: {summary.final_model}")
