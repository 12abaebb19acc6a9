"""`ddk-offline dumps info|verify PATH`: inspect a teacher dump (read-only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ddk_offline.commands._errors import exit_on_user_error, fail

# typer needs Optional[...] (not X | None) on Python 3.10.
# ruff: noqa: UP045


def summarise(manifest, path: str | Path) -> dict[str, Any]:
    """The dump's summary as plain data: settings, identity, and per (domain, split) counts.

    Returns:
        ``{"path", "complete", "format_version", "seq_len", "k", "teacher", "tokenizer", "codec", "temperatures",
        "packing", "hidden_states", "teacher_matrices", "domains": {name: {split: {sequences, tokens, teacher_loss,
        bytes, bytes_per_token, shards}}}, "total"}``; a teacher loss of an empty split is None; ``packing`` is the BOS
        policy and the start-up check (None for dumps that predate them); ``hidden_states`` and ``teacher_matrices``
        are None unless the dump stores them.
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
        "packing": manifest.packing,
        "hidden_states": manifest.hidden_states,
        "teacher_matrices": manifest.teacher_matrices,
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
    c = s["codec"]
    knobs = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (c.get("config") or {}).items())
    codec = f"{c.get('name')} layout {c.get('version')} ({knobs})"
    temps = ", ".join(f"{x:g}" for x in s["temperatures"])
    console.print(f"k {s['k']}, seq_len {s['seq_len']}, codec {codec}, lse temperatures {temps}")
    for line in packing_lines(s["packing"]):
        console.print(line)
    if (hs := s["hidden_states"]) is not None:
        console.print(f"hidden    teacher's last hidden state stored, D = {hs['dim']}, {hs['encoding']}")
    if (tm := s["teacher_matrices"]) is not None:
        console.print(
            f"matrices  {tm['file']}: head {tm['head_shape']}, embed {tm['embed_shape']}, {tm['dtype']}, "
            f"tied {tm['tied']}, {tm['bytes'] / 1e6:.1f} MB"
        )
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


def packing_lines(packing: dict[str, Any] | None) -> list[str]:
    """The BOS policy and the start-up check as rich-markup lines (a check off by more than its limit in red)."""
    from rich.markup import escape

    if packing is None:
        return ["packing   no BOS (a dump written before the policy was recorded); start-up check not run"]
    bos = packing.get("bos_token_id")
    token = escape(repr(packing.get("bos_token")))  # a token such as "[CLS]" is not rich markup
    where = "no BOS" if bos is None else f"BOS {token} (id {bos}) at each document and row start"
    convention = "adds BOS" if packing.get("tokenizer_adds_bos") else "adds no BOS"
    lines = [f"packing   {where} (--bos {packing.get('bos')}; the tokenizer {convention})"]
    check = packing.get("check")
    if not check or check.get("relative_difference") is None:
        lines.append("check     start-up check not run" + (" (nothing comparable)" if check else ""))
        return lines
    rel = check["relative_difference"]
    text = (
        f"packed rows {check['packed_bits_per_byte']:.3f} vs standard {check['standard_bits_per_byte']:.3f} "
        f"bits/byte ({rel:+.1%}) over {check['tokens']} tokens of {check['documents']} documents"
    )
    if abs(rel) > check.get("warn_above", 0.05):
        text = (
            f"[bold red]{text}: OFF BY MORE THAN {check['warn_above']:.0%}, the stored targets may come from a teacher "
            'out of distribution (docs/FORMAT.md, "BOS")[/bold red]'
        )
    lines.append(f"check     {text}")
    return lines


def register(app: typer.Typer) -> None:
    dumps = typer.Typer(help="Inspect teacher dumps written by dump-teacher.", no_args_is_help=True)
    app.add_typer(dumps, name="dumps")

    @dumps.command("info")
    @exit_on_user_error
    def info(
        path: Annotated[str, typer.Argument(help="The dump directory (holding manifest.json) or an fsspec URL.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")] = False,
    ) -> None:
        """Domains x splits (sequences, tokens, teacher loss, bytes/token) plus k, seq_len, teacher, tokenizer."""
        from ddk_offline.format.manifest import Manifest

        manifest = Manifest.load(path)
        if as_json:
            typer.echo(json.dumps(summarise(manifest, path), indent=2))
        else:
            print_info(manifest, path)

    _register_add_matrices(dumps)

    @dumps.command("verify")
    @exit_on_user_error
    def verify_cmd(
        path: Annotated[str, typer.Argument(help="The dump directory (holding manifest.json).")],
        sample_rows: Annotated[
            int, typer.Option(help="Rows per shard decoded through the top-k codec (0: every row).")
        ] = 4,
        repair: Annotated[
            bool, typer.Option("--repair", help="Recompute the broken shards (needs the dump's corpus and teacher).")
        ] = False,
        data: Annotated[
            Optional[str], typer.Option(help="With --repair: the corpus, if it moved since the dump (hash-checked).")
        ] = None,
        teacher: Annotated[
            Optional[str], typer.Option(help="With --repair: the teacher, if it moved since the dump (hash-checked).")
        ] = None,
        gguf_file: Annotated[Optional[str], typer.Option(help="With --repair: GGUF file inside --teacher.")] = None,
        trust_remote_code: Annotated[
            bool, typer.Option(help="With --repair: allow the teacher's own modelling code (off by default).")
        ] = False,
    ) -> None:
        """Check every shard against the manifest (checksum, rows, schema, a decoded sample); exit 1 naming each
        broken file. With --repair, recompute only the broken shards and verify again."""
        from ddk_offline.dump.verify import verify_dump
        from ddk_offline.format.storage import is_url

        if is_url(path):
            raise fail(f"{path}: dumps verify checks local dumps only; copy the dump to a local folder and verify it")
        if not Path(path).is_dir():
            raise fail(f"{path}: no such folder; pass the dump directory (the one holding manifest.json)")
        if not repair and (data or teacher or gguf_file):
            raise fail("--data, --teacher and --gguf-file only apply with --repair")
        report = verify_dump(path, sample_rows=sample_rows)
        _print_report(report)
        if repair and not report.ok:
            from ddk_offline.commands._quiet import quiet_libraries
            from ddk_offline.dump.repair import repair_dump

            quiet_libraries()

            if report.manifest is not None:  # without one, repair_dump refuses and says why
                typer.echo(f"repairing: recomputing {len(report.broken_shards)} broken shard(s) and any missing ones")
            result = repair_dump(
                path,
                data=data,
                teacher=teacher,
                gguf_file=gguf_file,
                trust_remote_code=trust_remote_code,
                sample_rows=sample_rows,
            )
            typer.echo(f"recomputed {result.stats.shards_written if result.stats else 0} shard(s); verifying again")
            report = result.after
            _print_report(report)
        if not report.ok:
            raise typer.Exit(1)


def _register_add_matrices(dumps: typer.Typer) -> None:
    @dumps.command("add-teacher-matrices")
    @exit_on_user_error
    def add_matrices(
        path: Annotated[str, typer.Argument(help="The dump directory (holding manifest.json).")],
        teacher: Annotated[
            Optional[str], typer.Option(help="The teacher (default: the manifest's; its hashes must match the dump).")
        ] = None,
        gguf_file: Annotated[Optional[str], typer.Option(help="GGUF file inside --teacher.")] = None,
        teacher_backend: Annotated[
            Optional[str], typer.Option(help="How the teacher runs (default: the dump's backend, e.g. hf).")
        ] = None,
        dtype: Annotated[str, typer.Option(help="Stored dtype: float16, bfloat16, float32.")] = "float16",
        device: Annotated[str, typer.Option(help="Where the teacher is loaded (no forward runs).")] = "cpu",
        trust_remote_code: Annotated[
            bool, typer.Option(help="Allow the teacher's own modelling code (off by default).")
        ] = False,
    ) -> None:
        """Add teacher_matrices.safetensors (embedding output, head, bias: what DSKD needs) to an existing dump.

        Loads the teacher once, refuses one whose hashes differ from the dump's, and does nothing when it is there.
        """
        from ddk_offline.commands._quiet import quiet_libraries
        from ddk_offline.dump.teacher_extras import add_teacher_matrices

        quiet_libraries()
        result = add_teacher_matrices(
            path,
            teacher=teacher,
            gguf_file=gguf_file,
            teacher_backend=teacher_backend,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            device=device,
        )
        typer.echo(result.message)


def _print_report(report) -> None:
    for problem in report.problems:
        typer.secho(str(problem), fg=typer.colors.RED, err=True)
    if report.ok:
        typer.echo(
            f"{report.path}: all {report.shards} shards match the manifest (size, sha256, rows, schema); "
            f"{report.rows_decoded} sampled rows decode"
        )
    else:
        bad = len(report.broken_shards)
        if report.manifest is None:  # nothing can be checked, finished or repaired without a trusted manifest
            fix = "the manifest cannot be used; fix it as the line above says"
        elif bad:
            fix = "`ddk-offline dumps verify --repair` recomputes them"
        else:
            fix = "rerun dump-teacher with the same arguments, or `dumps verify --repair`, to finish it"
        typer.secho(
            f"{report.path}: {len(report.problems)} problem(s), {bad} of {report.shards} shards broken; {fix}",
            fg=typer.colors.RED,
            err=True,
        )
