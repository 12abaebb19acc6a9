"""`ddk-offline bench-kernels`: time and measure the fused KD loss against torch baselines."""

from __future__ import annotations

from pathlib import Path

import typer


def _split(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise typer.BadParameter(f"{option}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}")
    return items


def register(app: typer.Typer) -> None:
    @app.command("bench-kernels")
    def bench_kernels(
        device: str = typer.Option("auto", help="cuda, cpu, or auto (cuda when available)."),
        dtype: str = typer.Option("auto", help="Logits dtype: bf16, fp16, fp32, or auto (bf16 on GPU, fp32 on CPU)."),
        shapes: str = typer.Option(
            "quick",
            help="Shape set: quick, full (GPU full: N 4096/16384 x 4 vocabs x k), or linear (N, V, k, D: inputs are "
            "hidden states and the head's weight; fused-linear against the logits path).",
        ),
        providers: str = typer.Option(
            "triton-fused,torch-chunked,torch-chunked-inplace,torch-eager,torch-compile,liger,fused-linear",
            help="Comma list of providers; unavailable ones are reported as skipped with the reason.",
        ),
        modes: str = typer.Option("forward,backward,full", help="Comma list of forward, backward, full."),
        loss_mode: str = typer.Option("renorm", help="KD target mode: renorm (top-k renormalised) or tail (exact)."),
        out_dir: str = typer.Option("benchmarks/results", help="Where the CSV (appended), JSON and PNG go."),
        cpu_reps: int = typer.Option(5, min=1, help="Timed repetitions per measurement on CPU (median reported)."),
    ) -> None:
        """Benchmark fused_kd_loss (and fused_linear_kd_loss): median ms, peak memory, GB/s against the 2·N·V·bytes
        floor."""
        from ddk_offline.bench.kernels import MODES, PROVIDERS, BenchConfig, run_benchmarks

        if shapes not in ("quick", "full", "linear"):
            raise typer.BadParameter(f"--shapes: {shapes!r}; choose quick, full or linear")
        from ddk_kernels import KD_MODES

        if loss_mode not in KD_MODES:
            raise typer.BadParameter(f"--loss-mode: {loss_mode!r}; choose one of {', '.join(KD_MODES)}")
        cfg = BenchConfig(
            device=device,
            dtype=dtype,
            shapes=shapes,
            providers=_split(providers, PROVIDERS, "--providers"),
            modes=_split(modes, MODES, "--modes"),
            loss_mode=loss_mode,
            out_dir=Path(out_dir),
            cpu_reps=cpu_reps,
        )
        path = run_benchmarks(cfg, log=typer.echo)
        typer.echo(f"results appended to {path}")


def main() -> None:
    """Run just this command (used by pipelines/bench_kernels.py)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app()
