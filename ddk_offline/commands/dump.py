"""`ddk-offline dump-teacher`: phase one. Parses options into a DumpConfig and calls ddk_offline.dump.run_dump."""

from __future__ import annotations

from typing import Optional

import typer

from ddk_offline.commands._errors import exit_on_user_error, fail
from ddk_offline.commands._quiet import quiet_libraries


def register(app: typer.Typer) -> None:
    # Defaults are spelled out here for --help; test_dump_cli checks they equal DumpConfig's.
    @app.command("dump-teacher")
    @exit_on_user_error
    def dump_teacher(
        ctx: typer.Context,
        teacher: str | None = typer.Option(None, help="Teacher: a model folder, a .gguf file, or a Hub name."),
        data: str | None = typer.Option(
            None, help="Corpus: a file, folder, glob, saved dataset, or a folder with one sub-folder per domain."
        ),
        out: str | None = typer.Option(None, help="Dump directory (created; rerun with the same options to resume)."),
        config_file: Optional[str] = typer.Option(  # noqa: UP045
            None,
            "--config",
            help="YAML/JSON file of options (keys = option names); options given here override it. A dump's "
            "dump_config.json is one.",
        ),
        text_column: str = typer.Option("text", help="Text field of structured corpora (jsonl, parquet, csv, ...)."),
        domain_column: str = typer.Option("domain", help="Domain field (not needed in the domain-folder layout)."),
        seq_len: int = typer.Option(512, help="Tokens per packed sequence."),
        top_k: int = typer.Option(64, help="Teacher logits kept per position."),
        batch_size: int = typer.Option(8, help="Sequences per teacher forward."),
        val_fraction: float = typer.Option(0.05, help="Fraction of each domain's sequences held out for validation."),
        max_tokens_per_domain: Optional[int] = typer.Option(  # noqa: UP045 - typer needs Optional on 3.10
            None, help="Use at most this many tokens per domain (default: all)."
        ),
        dtype: str = typer.Option("auto", help="Teacher dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, ..."),
        device: str = typer.Option("auto", help="Device: auto (CUDA if available), cpu, cuda, cuda:N."),
        shard_tokens: int = typer.Option(262144, help="Tokens per shard file (rows = shard_tokens // seq_len)."),
        extra_temperatures: str = typer.Option(
            "", help="Comma-separated temperatures T != 1 whose full-row logsumexp is also stored, e.g. '2.0'."
        ),
        trust_remote_code: bool = typer.Option(False, help="Allow the teacher's own modelling code (off by default)."),
        gguf_file: Optional[str] = typer.Option(  # noqa: UP045
            None, help="GGUF file inside the --teacher folder (or pass the .gguf path as --teacher)."
        ),
        teacher_backend: str = typer.Option("hf", help="How the teacher runs: hf (transformers)."),
        encode_workers: Optional[int] = typer.Option(  # noqa: UP045
            None, help="Processes running the top-k codec (default: the spare cores; 0: the writer thread)."
        ),
        bos: str = typer.Option(
            "auto",
            help="Start each document and packed row with the teacher's BOS token: auto (as its tokenizer does), "
            "always, never. A resumed dump keeps its own.",
        ),
        store_hidden_states: bool = typer.Option(
            False,
            "--store-hidden-states",
            help="Also store the teacher's last hidden state per position (column teacher_hidden, fp16 + zstd, about "
            "1.5 x D bytes/token), for DSKD's teacher-to-student half.",
        ),
        hidden_encoding: str = typer.Option(
            "fp16-bss-zstd",
            help="With --store-hidden-states: fp16-bss-zstd (default), bf16-bss-zstd, or int8-absmax-zstd (a third "
            "of the bytes, ~3% RMS error; benchmarks/results/dskd_extras.md).",
        ),
        store_teacher_matrices: bool = typer.Option(
            False,
            "--store-teacher-matrices",
            help="Also write teacher_matrices.safetensors (embedding output, head, bias) for DSKD: V x D per matrix, "
            "e.g. ~335 MB for Gemma-3-270M's tied 262,144 x 640 head in 16 bits.",
        ),
        matrices_dtype: str = typer.Option("float16", help="Teacher matrices dtype: float16, bfloat16, float32."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table."),
    ) -> None:
        """Run the teacher over a corpus and store its top-k logits, logsumexp and loss per position.

        Under `torchrun --nproc_per_node N -m ddk_offline dump-teacher ...` the ranks split the shards.
        """
        from ddk_offline.commands._warnings import loud_warnings
        from ddk_offline.dump import DumpConfig, run_dump
        from ddk_offline.dump.config import PackingMismatchWarning

        try:
            temps = tuple(float(t) for t in extra_temperatures.split(",") if t.strip())
        except ValueError:
            raise fail(
                f"--extra-temperatures {extra_temperatures!r}: use comma-separated numbers, e.g. 2.0,4.0"
            ) from None
        from dataclasses import fields

        from ddk_offline.commands._configfile import merged_settings

        names = {f.name for f in fields(DumpConfig)}
        cli = {k: v for k, v in ctx.params.items() if k in names} | {"extra_temperatures": temps}
        settings = merged_settings(ctx, DumpConfig, cli, config_file, ("teacher", "data", "out"))
        config = DumpConfig(**settings)
        out = config.out
        quiet_libraries()
        from ddk_offline.runtime.distributed import env_rank

        quiet = quiet or env_rank() != 0  # under torchrun only rank 0 draws progress and prints the summary
        progress = None if quiet else _RichProgress()
        try:
            with loud_warnings(PackingMismatchWarning):
                result = run_dump(config, progress=progress)
        except KeyboardInterrupt:
            typer.secho("interrupted: complete shards are kept; rerun the same command to resume", fg="red", err=True)
            raise typer.Exit(130) from None
        if not quiet:
            from ddk_offline.commands.dumps import print_info

            print_info(result.manifest, out)
            _print_stats(result.stats, config.seq_len)


class _RichProgress:
    """A rich progress bar per domain plus a total, with tokens/s."""

    def __init__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            TextColumn("{task.completed:>10,.0f}/{task.total:,.0f} tok"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._tasks: dict[str, int] = {}

    def start(self, todo_tokens: dict[str, int], done_tokens: dict[str, int]) -> None:
        if sum(done_tokens.values()):
            self._progress.console.print(
                f"resuming: {sum(done_tokens.values()):,} tokens are in shards kept from earlier runs"
            )
        self._progress.start()
        for name in sorted(todo_tokens):
            self._tasks[name] = self._progress.add_task(name, total=max(todo_tokens[name], 1), rate="")
        self._tasks["\0total"] = self._progress.add_task("total", total=max(sum(todo_tokens.values()), 1), rate="")

    def advance(self, domain: str, tokens: int) -> None:
        for key in (domain, "\0total"):
            task = self._tasks[key]
            self._progress.advance(task, tokens)
            speed = self._progress.tasks[task].speed
            self._progress.update(task, rate=f"{speed:,.0f} tok/s" if speed else "")

    def stop(self) -> None:
        self._progress.stop()


def _print_stats(stats, seq_len: int) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
    tokens = sum(stats.tokens.values())
    if not tokens:
        console.print(f"nothing to compute: all {stats.shards_kept} shards were already complete")
        return
    fwd = tokens / stats.forward_s if stats.forward_s else float("nan")
    full = tokens / stats.loop_s if stats.loop_s else float("nan")
    console.print(
        f"computed {tokens:,} tokens in {stats.shards_written} shards ({stats.shards_kept} kept from earlier runs); "
        f"teacher forward {fwd:,.0f} tok/s, full dump loop {full:,.0f} tok/s; everything but the forward took "
        f"{100 * stats.overhead:.1f}% of the loop ({stats.loop_s:.1f} s); pre-pass {stats.prepass_s:.1f} s, "
        f"model load {stats.load_s:.1f} s, start-up check {stats.check_s:.1f} s, total {stats.total_s:.1f} s"
    )
