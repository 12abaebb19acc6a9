"""Phase one: run the teacher over a packed corpus and write its top-k targets as a resumable sharded dump.

Flow: validate options -> resolve corpus and teacher (config + tokenizer only) -> the BOS policy (:mod:`.bos`; a
resumed dump keeps its own) -> pre-pass (tokenise and pack the whole corpus, count sequences per (domain, split),
hash the corpus; catches bad input before anything is written) -> identity hashes -> check / create ``--out`` under
a lock -> skip the shards the manifest already lists -> load the model only if work remains -> the start-up check
of the packing (:mod:`.bos_check`, once per dump, before its first shard) -> second pass (:mod:`.loop`): batches of
one shard's rows -> teacher -> :class:`~ddk_offline.format.writer.ShardWriter` (writer thread: codec, Parquet,
checksum, manifest update).

Bit-identical resume: a work item is one shard, (domain, split, shard index), holding the stream's sequences
``[j * R, (j + 1) * R)``; its batches are cut inside the shard (``batch_size`` rows, the last one shorter), so a
shard's batches, and therefore its bytes, do not depend on what else was computed in the run. Under ``torchrun`` the
ranks split these items without overlap (see :func:`run_dump` and :mod:`.ranks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict

import torch

import ddk_offline
from ddk_offline.dump import outdir, ranks
from ddk_offline.dump.bos import BosPolicy, resolve_bos
from ddk_offline.dump.bos_check import SampleDocuments, mismatch_message, packing_check
from ddk_offline.dump.config import DumpConfig, DumpProgress, DumpResult, DumpStats, PackingMismatchWarning
from ddk_offline.dump.corpus import open_corpus
from ddk_offline.dump.loop import DumpLoop
from ddk_offline.dump.packing import DomainStats, Packer
from ddk_offline.dump.teacher_extras import matrices_present, store_matrices
from ddk_offline.dump.teachers import TeacherBackend, open_teacher, tokenizer_identity
from ddk_offline.errors import UserError
from ddk_offline.format import hidden_codec
from ddk_offline.format.codec import TopKCodec
from ddk_offline.format.manifest import DomainInfo, Manifest, ShardInfo
from ddk_offline.format.schema import BOS_FORMAT_VERSION, FORMAT_VERSION
from ddk_offline.format.storage import Storage
from ddk_offline.runtime import distributed
from ddk_offline.runtime.device import resolve_device, resolve_dtype
from ddk_offline.runtime.files import json_bytes

#: Called after each new shard is durable and listed: (domain, split, shard index, info).
AfterShard = Callable[[str, str, int, ShardInfo], None]


def dump_teacher(config: DumpConfig, *, progress: DumpProgress | None = None) -> Manifest:
    """Write (or finish) the teacher dump described by ``config``; returns its final manifest.

    Raises:
        UserError: bad options, corpus, teacher or output directory (nothing is written in that case).
    """
    return run_dump(config, progress=progress).manifest


def run_dump(
    config: DumpConfig,
    *,
    teacher: TeacherBackend | None = None,
    progress: DumpProgress | None = None,
    after_shard: AfterShard | None = None,
    redo: frozenset[str] = frozenset(),
) -> DumpResult:
    """:func:`dump_teacher` that also returns the run's :class:`DumpStats`.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this with the same config: each one runs the pre-pass,
    rank 0 alone prepares ``--out`` (lock, manifest), the missing shards are dealt out round-robin (rank r computes
    the r-th, (r + world)-th, ... of them), other ranks journal their finished shards (:mod:`.ranks`), and
    rank 0 merges them into the manifest after a barrier. Every rank returns the final manifest and the stats summed
    over ranks (``loop_s`` is the slowest rank's).

    Args:
        config: the dump's options.
        teacher: the teacher backend to use (default: ``config.teacher_backend`` opened on ``config.teacher``).
        progress: optional progress sink (give it on rank 0 only).
        after_shard: called after each new shard is durable and listed in the manifest (tests inject kills here).
        redo: listed shard files to delete and recompute (``dumps verify --repair``: the shards that failed).
    """
    device = resolve_device(config.device)
    env = distributed.setup(device.type)
    try:
        if env.active and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", env.local_rank)  # one GPU per rank
        return _Dump(config, env, device, teacher).run(progress, after_shard, redo)
    finally:
        distributed.teardown(env)


class _Dump:
    """One run: the validated inputs (corpus, teacher, tokenizer) and the steps that use them."""

    def __init__(self, config: DumpConfig, env: distributed.DistEnv, device: torch.device, teacher):
        self.t0 = time.perf_counter()
        self.config, self.env, self.device = config, env, device
        config.validate()
        self.out = Storage(config.out)  # a local folder or an fsspec URL
        self.corpus = open_corpus(config.data, text_column=config.text_column, domain_column=config.domain_column)
        outdir.refuse_out_in_corpus(self.out, self.corpus.folders())
        self.teacher = teacher or open_teacher(
            config.teacher_backend,
            config.teacher,
            gguf_file=config.gguf_file,
            trust_remote_code=config.trust_remote_code,
        )
        self.dtype = resolve_dtype(config.dtype, device)
        self.tokenizer = self.teacher.tokenizer()
        self.vocab = self.teacher.vocab_size()
        self.loaded = False
        _check_teacher_limits(config, self.teacher, self.vocab, len(self.tokenizer))

    def run(self, progress: DumpProgress | None, after_shard: AfterShard | None, redo: frozenset[str]) -> DumpResult:
        config, env, out = self.config, self.env, self.out
        stats = DumpStats()
        self.bos = resolve_bos(config.bos, self.tokenizer, outdir.peek_manifest(out), config.out)
        domain_stats, self.samples = _prepass(config, self.corpus, self.tokenizer, self.bos)
        stats.prepass_s = time.perf_counter() - self.t0
        wanted = self._new_manifest(domain_stats)
        created = False  # whether this run made --out (removed again if it fails before its first shard)
        manifest = None
        with contextlib.ExitStack() as held:  # rank 0 holds the writer lock until the end of the run
            try:
                if env.is_main:
                    try:
                        manifest, created = ranks.prepare_out(out, wanted, self.tokenizer, held, redo)
                    except BaseException as e:
                        distributed.broadcast_object(env, ("error", f"rank 0: {e}"))
                        raise
                manifest = ranks.share_manifest(env, manifest, out, UserError)
                self._compute_mine(manifest, stats, progress, after_shard)
                distributed.barrier(env)  # every rank's shards are durable (and journalled) past this point
                stats = ranks.sum_stats(distributed.gather_objects(env, stats))
                if env.is_main:
                    try:
                        if config.store_teacher_matrices:
                            self._store_matrices(manifest, stats)
                        self._finish(manifest, stats)
                    except BaseException as e:
                        distributed.broadcast_object(env, ("error", f"rank 0: {e}"))
                        raise
                manifest = ranks.share_manifest(env, manifest, out, RuntimeError)
                stats.total_s = time.perf_counter() - self.t0
            except BaseException as e:
                removed = created and stats.shards_written == 0 and (not env.active or manifest is None)
                if removed:
                    # This run made the folder, holds its lock, and nothing in it is worth keeping.
                    out.remove("")
                removed = removed or not out.exists()  # prepare_out removes a folder it made when it fails
                if (full := outdir.disk_full_error(e, out, removed)) is not None:
                    raise full from e
                raise
        return DumpResult(manifest, stats)

    def _compute_mine(self, manifest: Manifest, stats: DumpStats, progress, after_shard) -> None:
        """Compute this rank's share of the missing shards (every missing shard for one process)."""
        todo = outdir.missing_shards(manifest, self.config.rows_per_shard)
        stats.shards_kept = sum(len(s.shards) for d in manifest.domains.values() for s in d.splits.values())
        items = [(name, split, j) for (name, split), js in sorted(todo.items()) for j in sorted(js)]
        mine = distributed.shard_of(items, self.env)
        check = bool(items) and self.env.is_main and manifest.packing_check is None
        if not mine and not check:
            return
        my_todo: dict[tuple[str, str], set[int]] = {key: set() for key in todo}
        for name, split, j in mine:
            my_todo[(name, split)].add(j)
        self._load(stats)
        if check:
            t2 = time.perf_counter()
            self._check_packing(manifest)
            stats.check_s = time.perf_counter() - t2
        if not mine:
            return
        loop = DumpLoop(
            self.config,
            self.corpus,
            self.tokenizer,
            self.teacher,
            manifest,
            self.out,
            stats,
            journal=None if self.env.is_main else self.out,
            progress=progress,
            after_shard=after_shard,
        )
        loop.run(my_todo)

    def _load(self, stats: DumpStats) -> None:
        if not self.loaded:
            t1 = time.perf_counter()
            self.teacher.load(device=self.device, dtype=self.dtype)
            stats.load_s += time.perf_counter() - t1
            self.loaded = True

    def _store_matrices(self, manifest: Manifest, stats: DumpStats) -> None:
        """Rank 0, --store-teacher-matrices: the teacher's embedding output, head and bias (once per dump)."""
        if not matrices_present(manifest, self.out, self.config.matrices_dtype):
            self._load(stats)  # a resumed dump with every shard done has not loaded the teacher yet
            store_matrices(self.teacher, manifest, self.out, self.config.matrices_dtype)

    def _check_packing(self, manifest: Manifest) -> None:
        """Rank 0, once per dump: the start-up check of the packing, recorded before the first shard is written."""
        check = packing_check(self.teacher, self.tokenizer, self.samples, seq_len=self.config.seq_len, policy=self.bos)
        manifest.packing = {**(manifest.packing or self.bos.record()), "check": check}
        manifest.write_atomic(self.out)
        if (message := mismatch_message(check, self.bos)) is not None:
            warnings.warn(PackingMismatchWarning(message), stacklevel=2)

    def _finish(self, manifest: Manifest, stats: DumpStats) -> None:
        """Rank 0: merge the other ranks' shards, check every planned shard is there, mark the dump complete."""
        ranks.merge(manifest, self.out)
        outdir.check_finished(manifest, self.out)
        manifest.complete = True
        manifest.write_atomic(self.out)
        outdir.clean_tmp(self.out)
        stats.total_s = time.perf_counter() - self.t0
        # The resolved config and this run's timings (``dump_config.json``; not part of the format).
        self.out.write_bytes_atomic(
            "dump_config.json", json_bytes({"config": asdict(self.config), "last_run": asdict(stats)})
        )

    def _new_manifest(self, domain_stats: dict[str, DomainStats]) -> Manifest:
        config = self.config
        corpus_hash = hashlib.sha256()
        for name, s in sorted(domain_stats.items()):
            corpus_hash.update(f"{name}\0{s.sha256}\0".encode())
        codec = TopKCodec(vocab_size=self.vocab, k=config.top_k)
        hidden = {}  # absent unless asked for: a default dump's settings (and bytes) stay as they were
        if config.store_hidden_states:
            hidden = {"hidden_states": hidden_codec.describe(config.hidden_encoding, self.teacher.hidden_size())}
        return Manifest(
            teacher=self.teacher.identity(),
            tokenizer=tokenizer_identity(self.tokenizer, self.vocab),
            seq_len=config.seq_len,
            k=config.top_k,
            codec=codec.describe(),
            corpus=self.corpus.describe()
            | {"sha256": corpus_hash.hexdigest()}
            | {"domains": {n: s.to_dict() for n, s in sorted(domain_stats.items())}},
            settings={
                "val_fraction": config.val_fraction,
                "max_tokens_per_domain": config.max_tokens_per_domain,
                "rows_per_shard": config.rows_per_shard,
                "batch_size": config.batch_size,
                "dtype": str(self.dtype).removeprefix("torch."),
                "device_type": self.device.type,
                "split_rule": "val when round((i+1)*f) > round(i*f), round half up",
            }
            | hidden,
            temperatures=[1.0, *config.temperatures],
            domains={n: DomainInfo(n, d) for n, d in outdir.domain_dirs(sorted(domain_stats)).items()},
            created_by=f"ddk-offline {ddk_offline.__version__}",
            format_version=FORMAT_VERSION if self.bos.token_id is None else BOS_FORMAT_VERSION,
            packing=self.bos.record(),
        )


def _check_teacher_limits(config: DumpConfig, teacher: TeacherBackend, vocab: int, tokens: int) -> None:
    if config.top_k > vocab:
        raise UserError(f"--top-k {config.top_k}: above the teacher's vocabulary ({vocab} logits); lower --top-k")
    max_pos = teacher.max_positions()
    if max_pos is not None and config.seq_len > max_pos:
        raise UserError(
            f"--seq-len {config.seq_len}: above the teacher's max_position_embeddings ({max_pos}, {teacher.name} "
            "config); lower --seq-len"
        )
    if tokens > vocab:
        raise UserError(
            f"--teacher {teacher.name}: the tokenizer has {tokens} tokens but the model only {vocab} logits; "
            "they do not belong together"
        )


def _prepass(
    config: DumpConfig, corpus, tokenizer, bos: BosPolicy
) -> tuple[dict[str, DomainStats], dict[str, list[str]]]:
    """Tokenise and pack everything once, counting only: validates the corpus before any output exists.

    Returns:
        The per-domain counts and the first documents of each domain (for the start-up check).
    """
    packer = Packer(
        tokenizer,
        seq_len=config.seq_len,
        val_fraction=config.val_fraction,
        max_tokens_per_domain=config.max_tokens_per_domain,
        bos_token_id=bos.token_id,
    )
    samples = SampleDocuments()
    for _ in packer.pack(samples.watch(corpus.documents())):
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
    return packer.stats, samples.texts
