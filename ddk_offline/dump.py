"""Phase one: run the teacher over a packed corpus and write its top-k targets as a resumable sharded dump.

Flow: validate options -> resolve corpus and teacher (config + tokenizer only) -> pre-pass (tokenise and pack the
whole corpus, count sequences per (domain, split), hash the corpus; catches bad input before anything is written)
-> identity hashes -> check / create ``--out`` under a lock -> skip the shards the manifest already lists ->
load the model only if work remains -> second pass: batches of one shard's rows -> teacher forward ->
:class:`ShardWriter` (writer thread: codec, Parquet, checksum, manifest update).

Bit-identical resume: a work item is one shard, (domain, split, shard index), holding the stream's sequences
``[j * R, (j + 1) * R)``; its batches are cut inside the shard (``batch_size`` rows, the last one shorter), so a
shard's batches, and therefore its bytes, do not depend on what else was computed in the run. Under ``torchrun`` the
ranks split these items without overlap (see :func:`run_dump` and :mod:`ddk_offline.dump_ranks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

import ddk_offline
from ddk_offline import distributed, dump_ranks, dumpdir
from ddk_offline.corpus import open_corpus
from ddk_offline.errors import UserError
from ddk_offline.format.codec import TopKCodec
from ddk_offline.format.manifest import DomainInfo, Manifest, ShardInfo, json_bytes
from ddk_offline.format.schema import SPLITS
from ddk_offline.format.storage import Storage
from ddk_offline.format.writer import SequenceRecord, ShardWriter
from ddk_offline.packing import DomainStats, PackedSequence, Packer
from ddk_offline.teacher import (
    compute_targets,
    load_config,
    load_model,
    load_tokenizer,
    max_positions_of,
    resolve_device,
    resolve_dtype,
    resolve_teacher,
    teacher_identity,
    tokenizer_identity,
    vocab_size_of,
)


@dataclass
class DumpConfig:
    """Every option of ``dump-teacher``; the one place for defaults (the CLI mirrors these).

    Attributes:
        teacher: local model folder, ``.gguf`` file, or Hub name.
        data: corpus file, folder, glob, saved dataset or Hub dataset name (see :mod:`ddk_offline.corpus`).
        out: the dump directory (created after validation passes): a local path or an fsspec URL (``s3://...``).
        text_column, domain_column: field names in structured corpora.
        seq_len: tokens per packed sequence (L).
        top_k: teacher logits kept per position (K).
        batch_size: sequences per teacher forward.
        val_fraction: fraction of each domain's sequences held out as ``val``.
        max_tokens_per_domain: cap per domain (train + val), None for no cap.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        shard_tokens: tokens per shard; rows per shard = max(1, shard_tokens // seq_len).
        extra_temperatures: temperatures T != 1 whose full-row logsumexp(logits / T) is also stored.
        trust_remote_code: allow the teacher's own modelling code (off by default).
        gguf_file: GGUF file name inside ``teacher`` when ``teacher`` is a folder.
    """

    teacher: str
    data: str
    out: str
    text_column: str = "text"
    domain_column: str = "domain"
    seq_len: int = 512
    top_k: int = 64
    batch_size: int = 8
    val_fraction: float = 0.05
    max_tokens_per_domain: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    shard_tokens: int = 262144
    extra_temperatures: tuple[float, ...] = ()
    trust_remote_code: bool = False
    gguf_file: str | None = None

    def validate(self) -> None:
        """Raise :class:`UserError` naming the option for any value out of range."""
        checks = [
            (self.seq_len >= 2, "--seq-len", f"{self.seq_len}: must be at least 2"),
            (self.top_k >= 1, "--top-k", f"{self.top_k}: must be at least 1"),
            (self.batch_size >= 1, "--batch-size", f"{self.batch_size}: must be at least 1"),
            (0 <= self.val_fraction < 1, "--val-fraction", f"{self.val_fraction}: must be in [0, 1)"),
            (self.shard_tokens >= 1, "--shard-tokens", f"{self.shard_tokens}: must be positive"),
            (
                self.max_tokens_per_domain is None or self.max_tokens_per_domain >= self.seq_len,
                "--max-tokens-per-domain",
                f"{self.max_tokens_per_domain}: must be at least --seq-len ({self.seq_len})",
            ),
            (
                all(t > 0 and math.isfinite(t) for t in self.extra_temperatures),
                "--extra-temperatures",
                f"{list(self.extra_temperatures)}: temperatures must be positive",
            ),
        ]
        for ok, option, what in checks:
            if not ok:
                raise UserError(f"{option} {what}")

    @property
    def temperatures(self) -> tuple[float, ...]:
        """Extra temperatures, sorted, without duplicates and without 1.0 (always stored)."""
        return tuple(sorted({float(t) for t in self.extra_temperatures} - {1.0}))

    @property
    def rows_per_shard(self) -> int:
        return max(1, self.shard_tokens // self.seq_len)


class DumpProgress(Protocol):
    """What the dump reports while it runs (the CLI draws a rich progress bar from it)."""

    def start(self, todo_tokens: dict[str, int], done_tokens: dict[str, int]) -> None: ...

    def advance(self, domain: str, tokens: int) -> None: ...

    def stop(self) -> None: ...


@dataclass
class DumpStats:
    """Timings of one run (not stored in the manifest: they differ between runs of the same dump).

    ``forward_s`` is the time inside the teacher's forward; ``loop_s`` the wall time from the model being ready to
    the last shard being durable, so ``1 - forward_s / loop_s`` is everything else's share of the dump loop.
    """

    prepass_s: float = 0.0
    load_s: float = 0.0
    forward_s: float = 0.0
    loop_s: float = 0.0
    total_s: float = 0.0
    tokens: dict[str, int] = field(default_factory=dict)
    shards_written: int = 0
    shards_kept: int = 0
    world: int = 1

    @property
    def overhead(self) -> float:
        return 1.0 - self.forward_s / self.loop_s if self.loop_s > 0 else 0.0


@dataclass
class DumpResult:
    manifest: Manifest
    stats: DumpStats


def dump_teacher(config: DumpConfig, *, progress: DumpProgress | None = None) -> Manifest:
    """Write (or finish) the teacher dump described by ``config``; returns its final manifest.

    Raises:
        UserError: bad options, corpus, teacher or output directory (nothing is written in that case).
    """
    return run_dump(config, progress=progress).manifest


def run_dump(
    config: DumpConfig,
    *,
    progress: DumpProgress | None = None,
    after_shard: Callable[[str, str, int, ShardInfo], None] | None = None,
    redo: frozenset[str] = frozenset(),
) -> DumpResult:
    """:func:`dump_teacher` that also returns the run's :class:`DumpStats`.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this with the same config: each one runs the pre-pass,
    rank 0 alone prepares ``--out`` (lock, manifest), the missing shards are dealt out round-robin (rank r computes
    the r-th, (r + world)-th, ... of them), other ranks journal their finished shards (:mod:`.dump_ranks`), and
    rank 0 merges them into the manifest after a barrier. Every rank returns the final manifest and the stats summed
    over ranks (``loop_s`` is the slowest rank's).

    Args:
        config: the dump's options.
        progress: optional progress sink (give it on rank 0 only).
        after_shard: called after each new shard is durable and listed in the manifest (tests inject kills here).
        redo: listed shard files to delete and recompute (``dumps verify --repair``: the shards that failed).
    """
    device = resolve_device(config.device)
    env = distributed.setup(device.type)
    try:
        if env.active and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", env.local_rank)  # one GPU per rank
        return _run_dump(config, env, device, progress, after_shard, redo)
    finally:
        distributed.teardown(env)


def _run_dump(config: DumpConfig, env, device: torch.device, progress, after_shard, redo) -> DumpResult:
    t0 = time.perf_counter()
    stats = DumpStats()
    config.validate()
    out = Storage(config.out)  # a local folder or an fsspec URL
    corpus = open_corpus(config.data, text_column=config.text_column, domain_column=config.domain_column)
    source = resolve_teacher(config.teacher, config.gguf_file)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    model_config = load_config(source, trust_remote_code=config.trust_remote_code)
    vocab = vocab_size_of(model_config)
    _check_teacher_limits(config, model_config, vocab, len(tokenizer), source.name)

    domain_stats = _prepass(config, corpus, tokenizer)
    stats.prepass_s = time.perf_counter() - t0
    wanted = _new_manifest(
        config, corpus.describe(), domain_stats, source, model_config, tokenizer, vocab, dtype, device
    )
    created = False  # whether this run made --out (removed again if it fails before its first shard)
    manifest = None
    with contextlib.ExitStack() as held:  # rank 0 holds the writer lock until the end of the run
        try:
            if env.is_main:
                try:
                    manifest, created = dump_ranks.prepare_out(out, wanted, tokenizer, held, redo)
                except BaseException as e:
                    distributed.broadcast_object(env, ("error", f"rank 0: {e}"))
                    raise
            manifest = dump_ranks.share_manifest(env, manifest, out, UserError)
            todo = dumpdir.missing_shards(manifest, config.rows_per_shard)
            stats.shards_kept = sum(len(s.shards) for d in manifest.domains.values() for s in d.splits.values())
            items = [(name, split, j) for (name, split), js in sorted(todo.items()) for j in sorted(js)]
            mine = distributed.shard_of(items, env)
            if mine:
                my_todo: dict[tuple[str, str], set[int]] = {key: set() for key in todo}
                for name, split, j in mine:
                    my_todo[(name, split)].add(j)
                t1 = time.perf_counter()
                model = load_model(source, dtype=dtype, device=device, trust_remote_code=config.trust_remote_code)
                stats.load_s = time.perf_counter() - t1
                journal = None if env.is_main else out
                _compute(
                    config, corpus, tokenizer, model, manifest, out, my_todo, stats, progress, after_shard, journal
                )
            distributed.barrier(env)  # every rank's shards are durable (and journalled) past this point
            stats = dump_ranks.sum_stats(distributed.gather_objects(env, stats))
            if env.is_main:
                try:
                    dump_ranks.merge(manifest, out)
                    dumpdir.check_finished(manifest, out)
                    manifest.complete = True
                    manifest.write_atomic(out)
                    dumpdir.clean_tmp(out)
                    stats.total_s = time.perf_counter() - t0
                    _log_run(out, config, stats)
                except BaseException as e:
                    distributed.broadcast_object(env, ("error", f"rank 0: {e}"))
                    raise
            manifest = dump_ranks.share_manifest(env, manifest, out, RuntimeError)
            stats.total_s = time.perf_counter() - t0
        except BaseException as e:
            removed = created and stats.shards_written == 0 and (not env.active or manifest is None)
            if removed:
                # This run made the folder, holds its lock, and nothing in it is worth keeping.
                out.remove("")
            removed = removed or not out.exists()  # prepare_out removes a folder it made when it fails
            if (full := dumpdir.disk_full_error(e, out, removed)) is not None:
                raise full from e
            raise
    return DumpResult(manifest, stats)


def _check_teacher_limits(config: DumpConfig, model_config, vocab: int, tokens: int, name: str) -> None:
    if config.top_k > vocab:
        raise UserError(f"--top-k {config.top_k}: above the teacher's vocabulary ({vocab} logits); lower --top-k")
    max_pos = max_positions_of(model_config)
    if max_pos is not None and config.seq_len > max_pos:
        raise UserError(
            f"--seq-len {config.seq_len}: above the teacher's max_position_embeddings ({max_pos}, {name} config); "
            "lower --seq-len"
        )
    if tokens > vocab:
        raise UserError(
            f"--teacher {name}: the tokenizer has {tokens} tokens but the model only {vocab} logits; "
            "they do not belong together"
        )


def _prepass(config: DumpConfig, corpus, tokenizer) -> dict[str, DomainStats]:
    """Tokenise and pack everything once, counting only: validates the corpus before any output exists."""
    packer = Packer(
        tokenizer,
        seq_len=config.seq_len,
        val_fraction=config.val_fraction,
        max_tokens_per_domain=config.max_tokens_per_domain,
    )
    for _ in packer.pack(corpus.documents()):
        pass
    if not packer.stats:
        raise UserError(f"--data {config.data}: the corpus holds no documents; check the path and the files")
    total = sum(s.documents for s in packer.stats.values())
    if total == 0:
        empty = sum(s.empty_documents for s in packer.stats.values())
        raise UserError(
            f"--data {config.data}: all {empty} documents are empty (field {config.text_column!r}); check --text-column"
        )
    for name, s in packer.stats.items():
        if s.sequences["train"] + s.sequences["val"] == 0:
            raise UserError(
                f"--data {config.data}: domain {name!r} has {s.tokens} tokens, fewer than one sequence of --seq-len "
                f"{config.seq_len}; add text to the domain, remove it, or lower --seq-len"
            )
    return packer.stats


def _new_manifest(config, corpus_info, domain_stats, source, model_config, tokenizer, vocab, dtype, device) -> Manifest:
    corpus_hash = hashlib.sha256()
    for name, s in sorted(domain_stats.items()):
        corpus_hash.update(f"{name}\0{s.sha256}\0".encode())
    codec = TopKCodec(vocab_size=vocab, k=config.top_k)
    return Manifest(
        teacher=teacher_identity(source, model_config),
        tokenizer=tokenizer_identity(tokenizer, vocab),
        seq_len=config.seq_len,
        k=config.top_k,
        codec=codec.describe(),
        corpus=corpus_info
        | {"sha256": corpus_hash.hexdigest()}
        | {"domains": {n: s.to_dict() for n, s in sorted(domain_stats.items())}},
        settings={
            "val_fraction": config.val_fraction,
            "max_tokens_per_domain": config.max_tokens_per_domain,
            "rows_per_shard": config.rows_per_shard,
            "batch_size": config.batch_size,
            "dtype": str(dtype).removeprefix("torch."),
            "device_type": device.type,
            "split_rule": "val when round((i+1)*f) > round(i*f), round half up",
        },
        temperatures=[1.0, *config.temperatures],
        domains={n: DomainInfo(n, d) for n, d in dumpdir.domain_dirs(sorted(domain_stats)).items()},
        created_by=f"ddk-offline {ddk_offline.__version__}",
    )


def _compute(config, corpus, tokenizer, model, manifest, out, todo, stats, progress, after_shard, journal) -> None:
    """The dump loop: second pass over the corpus, teacher forward per batch, records to the writer thread.

    ``todo`` holds this process's shards only. With ``journal`` set (ranks other than 0) a finished shard is
    journalled for rank 0 instead of being written into the manifest.
    """
    R, B = config.rows_per_shard, config.batch_size
    planned = {(n, s): manifest.corpus["domains"][n]["sequences"][s] for n in manifest.domains for s in SPLITS}

    written: list[tuple[str, str]] = []  # (domain, file) of this run's shards

    def on_shard(domain: str, split: str, index: int, info: ShardInfo) -> None:  # runs on the writer thread
        if journal is not None:
            dump_ranks.record(journal, domain, split, info)
        else:
            shards = manifest.domains[domain].splits[split].shards
            shards.append(info)
            shards.sort(key=lambda s: s.first_seq)
            manifest.write_atomic(out)
        stats.shards_written += 1
        written.append((domain, info.file))
        if after_shard is not None:
            after_shard(domain, split, index, info)

    todo_tokens = {n: 0 for n in manifest.domains}
    for (name, split), shards in todo.items():
        for j in shards:
            todo_tokens[name] += (min((j + 1) * R, planned[(name, split)]) - j * R) * config.seq_len
    done_tokens = {n: manifest.corpus["domains"][n]["sequences"] for n in manifest.domains}
    done_tokens = {n: (v["train"] + v["val"]) * config.seq_len - todo_tokens[n] for n, v in done_tokens.items()}
    stats.tokens = dict.fromkeys(manifest.domains, 0)
    if progress is not None:
        progress.start(todo_tokens, done_tokens)
    packer = Packer(
        tokenizer,
        seq_len=config.seq_len,
        val_fraction=config.val_fraction,
        max_tokens_per_domain=config.max_tokens_per_domain,
    )
    pending: dict[tuple[str, str], list[PackedSequence]] = {}
    start = time.perf_counter()
    try:
        with ShardWriter(
            out,
            codec=TopKCodec.from_description(manifest.codec, vocab_size=manifest.vocab_size, k=manifest.k),
            rows_per_shard=R,
            domain_dirs={n: d.dir for n, d in manifest.domains.items()},
            on_shard=on_shard,
            extra_temperatures=tuple(manifest.temperatures[1:]),
        ) as writer:
            for seq in packer.pack(corpus.documents()):
                key = (seq.domain, seq.split)
                if seq.seq_index // R not in todo.get(key, ()):  # done, or a domain the pre-pass never saw
                    continue
                batch = pending.setdefault(key, [])
                batch.append(seq)
                shard_end = min((seq.seq_index // R + 1) * R, planned[key])
                if len(batch) == B or seq.seq_index + 1 == shard_end:
                    _run_batch(model, batch, manifest, writer, stats, progress)
                    pending[key] = []
                    if seq.seq_index + 1 == shard_end and shard_end % R:
                        writer.end_stream(*key)  # the stream's short last shard is complete
    finally:
        if progress is not None:
            progress.stop()
    stats.loop_s = time.perf_counter() - start
    planned_hashes = {n: d["sha256"] for n, d in manifest.corpus["domains"].items()}
    got = {n: s.sha256 for n, s in packer.stats.items()}
    changed = sorted(n for n in planned_hashes.keys() | got.keys() if got.get(n) != planned_hashes.get(n))
    if changed:
        # This run's shards of those domains may hold the new text: unlist them, so the dump stays the old corpus's.
        dumpdir.forget_shards(manifest, out, {f for d, f in written if d in changed})
        manifest.write_atomic(out)
        raise UserError(
            f"--data {config.data}: the corpus changed while the dump was running (domains {changed}); this run's "
            "shards of those domains were discarded. Restore the corpus and rerun to finish the dump, or dump the "
            "new corpus into another --out"
        )


def _run_batch(model, batch: list[PackedSequence], manifest: Manifest, writer, stats, progress) -> None:
    ids = torch.from_numpy(np.stack([s.input_ids for s in batch]))
    temps = tuple(manifest.temperatures[1:])
    t = compute_targets(model, ids, k=manifest.k, extra_temperatures=temps)
    stats.forward_s += t.forward_s
    for b, seq in enumerate(batch):
        writer.put(
            SequenceRecord(
                seq.domain,
                seq.split,
                seq.seq_index,
                seq.input_ids,
                t.topk_ids[b],
                t.topk_logits[b],
                t.lse[b],
                t.nll[b],
                {T: v[b] for T, v in t.extra_lse.items()},
            )
        )
    n = ids.numel()
    stats.tokens[batch[0].domain] += n
    if progress is not None:
        progress.advance(batch[0].domain, n)


def _log_run(out: Storage, config: DumpConfig, stats: DumpStats) -> None:
    """Save the resolved config and this run's timings (``dump_config.json``; not part of the format)."""
    out.write_bytes_atomic("dump_config.json", json_bytes({"config": asdict(config), "last_run": asdict(stats)}))
