"""`ddk-offline dumps info|verify PATH`: inspect a teacher dump (read-only)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ddk_offline.commands._errors import exit_on_user_error


def summarise(manifest, path: str | Path) -> dict[str, Any]:
    """The dump's summary as plain data: settings, identity, and per (domain, split) counts.

    Returns:
        ``{"path", "complete", "format_version", "seq_len", "k", "teacher", "tokenizer", "codec", "temperatures",
        "domains": {name: {split: {sequences, tokens, teacher_loss, bytes, bytes_per_token, shards}}}, "total"}``;
        a teacher loss of an empty split is None.
    """
    domains: dict[str, dict[str, Any]] = {}
    total = {"sequences": 0, "tokens": 0, "bytes": 0}
    for name in sorted(manifest.domains):
        domains[name] = {}
        for split, info in sorted(manifest.domains[name].splits.items(), key=lambda kv: kv[0] != "train"):
            loss = info.teacher_loss
            domains[name][split] = {
                "sequences": info.sequences,
                "tokens": info.tokens,
                "teacher_loss": None if math.isnan(loss) else loss,
                "bytes": info.bytes,
                "bytes_per_token": info.bytes / info.tokens if info.tokens else None,
                "shards": len(info.shards),
            }
            for key in total:
                total[key] += domains[name][split][key]
    total["bytes_per_token"] = total["bytes"] / total["tokens"] if total["tokens"] else None
    return {
        "path": str(path),
        "complete": manifest.complete,
        "format_version": manifest.format_version,
        "seq_len": manifest.seq_len,
        "k": manifest.k,
        "teacher": manifest.teacher,
        "tokenizer": manifest.tokenizer,
        "codec": manifest.codec,
        "temperatures": manifest.temperatures,
        "domains": domains,
        "total": total,
    }


def print_info(manifest, path: str | Path) -> None:
    """Print the dump's header and a domains x splits table with rich."""
    from rich.console import Console
    from rich.table import Table

    s = summarise(manifest, path)
    t, tok = s["teacher"], s["tokenizer"]
    console = Console(soft_wrap=True)
    state = "complete" if s["complete"] else "[yellow]incomplete (rerun dump-teacher to finish)[/yellow]"
    console.print(f"[bold]{s['path']}[/bold]: format v{s['format_version']}, {state}")
    teacher = t.get("name", "?") + (f" ({t['gguf_file']})" if t.get("gguf_file") else "")
    console.print(
        f"teacher   {teacher}, {t.get('architecture', '?')}, weights sha256 {str(t.get('weights_sha256'))[:12]}"
    )
    console.print(
        f"tokenizer vocab {tok.get('vocab_size')} logits / {tok.get('tokens')} tokens, eos {tok.get('eos_token')!r}, "
        f"vocab sha256 {str(tok.get('vocab_sha256'))[:12]}"
    )
    codec = ", ".join(f"{k}={v}" for k, v in s["codec"].items())
    temps = ", ".join(f"{x:g}" for x in s["temperatures"])
    console.print(f"k {s['k']}, seq_len {s['seq_len']}, codec {codec}, lse temperatures {temps}")
    table = Table("domain", "split", "sequences", "tokens", "teacher loss", "bytes/token", "shards")
    for name, splits in s["domains"].items():
        for split, row in splits.items():
            loss = "-" if row["teacher_loss"] is None else f"{row['teacher_loss']:.4f}"
            bpt = "-" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:.1f}"
            table.add_row(name, split, f"{row['sequences']:,}", f"{row['tokens']:,}", loss, bpt, str(row["shards"]))
    tot = s["total"]
    bpt = "-" if tot["bytes_per_token"] is None else f"{tot['bytes_per_token']:.1f}"
    table.add_row("[bold]total[/bold]", "", f"{tot['sequences']:,}", f"{tot['tokens']:,}", "", bpt, "")
    console.print(table)


def verify(path: Path) -> list[str]:
    """Check every shard listed in the manifest against its size and sha256; returns the problems found."""
    from ddk_offline.format.manifest import Manifest

    manifest = Manifest.load(path)
    problems = []
    for name, info in sorted(manifest.domains.items()):
        for split, sinfo in info.splits.items():
            for shard in sinfo.shards:
                file = path / shard.file
                if not file.is_file():
                    problems.append(f"{file}: missing ({name}/{split})")
                    continue
                h = hashlib.sha256()
                with open(file, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 22), b""):
                        h.update(block)
                if file.stat().st_size != shard.bytes or h.hexdigest() != shard.sha256:
                    problems.append(f"{file}: size or sha256 differs from the manifest ({name}/{split})")
    return problems


def register(app: typer.Typer) -> None:
    dumps = typer.Typer(help="Inspect teacher dumps written by dump-teacher.", no_args_is_help=True)
    app.add_typer(dumps, name="dumps")

    @dumps.command("info")
    @exit_on_user_error
    def info(
        path: Annotated[Path, typer.Argument(help="The dump directory (holding manifest.json).")],
        as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")] = False,
    ) -> None:
        """Domains x splits (sequences, tokens, teacher loss, bytes/token) plus k, seq_len, teacher, tokenizer."""
        from ddk_offline.format.manifest import Manifest

        manifest = Manifest.load(path)
        if as_json:
            typer.echo(json.dumps(summarise(manifest, path), indent=2))
        else:
            print_info(manifest, path)

    @dumps.command("verify")
    @exit_on_user_error
    def verify_cmd(path: Annotated[Path, typer.Argument(help="The dump directory (holding manifest.json).")]) -> None:
        """Re-hash every shard and compare with the manifest (exit status 1 on any difference)."""
        problems = verify(path)
        for p in problems:
            typer.secho(p, fg=typer.colors.RED, err=True)
        if problems:
            raise typer.Exit(1)
        typer.echo(f"{path}: all shards match the manifest")
