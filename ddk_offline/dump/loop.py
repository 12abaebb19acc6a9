"""The dump loop: a second pass over the corpus, the teacher per batch, records to the shard writer thread.

Only the shards in ``todo`` are computed (this process's share of the missing ones). Batches are cut inside a shard,
so a shard's bytes never depend on which other shards a run computes (resume and torchrun give identical dumps).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ddk_offline.dump import outdir, ranks
from ddk_offline.dump.config import DumpConfig, DumpProgress, DumpStats
from ddk_offline.dump.corpus import Corpus
from ddk_offline.dump.packing import PackedSequence, Packer
from ddk_offline.dump.teachers import TeacherBackend
from ddk_offline.errors import UserError
from ddk_offline.format import hidden_codec
from ddk_offline.format.codec import TopKCodec
from ddk_offline.format.manifest import Manifest, ShardInfo
from ddk_offline.format.schema import SPLITS
from ddk_offline.format.storage import Storage
from ddk_offline.format.workers import auto_workers
from ddk_offline.format.writer import SequenceRecord, ShardWriter


class DumpLoop:
    """Computes shards of one dump with a loaded teacher.

    Args:
        config, corpus, tokenizer, teacher: the run's validated inputs (the teacher already loaded).
        manifest: the manifest being filled (rank 0 writes it after each shard).
        out: the dump directory.
        stats: the run's stats, updated in place.
        journal: for ranks other than 0, where finished shards are journalled for rank 0 (instead of the manifest).
        progress: optional progress sink.
        after_shard: called after each new shard is durable and listed (tests inject kills here).
    """

    def __init__(
        self,
        config: DumpConfig,
        corpus: Corpus,
        tokenizer,
        teacher: TeacherBackend,
        manifest: Manifest,
        out: Storage,
        stats: DumpStats,
        *,
        journal: Storage | None = None,
        progress: DumpProgress | None = None,
        after_shard=None,
    ):
        self.config, self.corpus, self.tokenizer, self.teacher = config, corpus, tokenizer, teacher
        self.manifest, self.out, self.stats = manifest, out, stats
        self.journal, self.progress, self.after_shard = journal, progress, after_shard
        self.planned = {(n, s): manifest.planned_sequences(n, s) for n in manifest.domains for s in SPLITS}
        self.written: list[tuple[str, str]] = []  # (domain, file) of this run's shards

    def _on_shard(self, domain: str, split: str, index: int, info: ShardInfo) -> None:  # on the writer thread
        if self.journal is not None:
            ranks.record(self.journal, domain, split, info)
        else:
            shards = self.manifest.domains[domain].splits[split].shards
            shards.append(info)
            shards.sort(key=lambda s: s.first_seq)
            self.manifest.write_atomic(self.out)
        self.stats.shards_written += 1
        self.written.append((domain, info.file))
        if self.after_shard is not None:
            self.after_shard(domain, split, index, info)

    def _start_progress(self, todo: dict[tuple[str, str], set[int]]) -> None:
        R, L, m = self.config.rows_per_shard, self.config.seq_len, self.manifest
        todo_tokens = dict.fromkeys(m.domains, 0)
        for (name, split), shards in todo.items():
            for j in shards:
                todo_tokens[name] += (min((j + 1) * R, self.planned[(name, split)]) - j * R) * L
        done_tokens = {n: sum(self.planned[(n, s)] for s in SPLITS) * L - todo_tokens[n] for n in m.domains}
        self.progress.start(todo_tokens, done_tokens)

    def run(self, todo: dict[tuple[str, str], set[int]]) -> None:
        """Compute the shards ``todo`` ((domain, split) -> shard indices); each is durable when this returns."""
        config, manifest = self.config, self.manifest
        R, B = config.rows_per_shard, config.batch_size
        self.stats.tokens = dict.fromkeys(manifest.domains, 0)
        if self.progress is not None:
            self._start_progress(todo)
        packer = Packer(
            self.tokenizer,
            seq_len=config.seq_len,
            val_fraction=config.val_fraction,
            max_tokens_per_domain=config.max_tokens_per_domain,
            bos_token_id=manifest.bos_token_id,  # the dump's own policy (a resume keeps it)
        )
        pending: dict[tuple[str, str], list[PackedSequence]] = {}
        start = time.perf_counter()
        try:
            with ShardWriter(
                self.out,
                codec=TopKCodec.from_description(manifest.codec, vocab_size=manifest.vocab_size, k=manifest.k),
                rows_per_shard=R,
                domain_dirs={n: d.dir for n, d in manifest.domains.items()},
                on_shard=self._on_shard,
                extra_temperatures=tuple(manifest.temperatures[1:]),
                encode_workers=auto_workers() if config.encode_workers is None else config.encode_workers,
                format_version=manifest.format_version,
                hidden_encoding=(manifest.hidden_states or {}).get("encoding"),
            ) as writer:
                for seq in packer.pack(self.corpus.documents()):
                    key = (seq.domain, seq.split)
                    if seq.seq_index // R not in todo.get(key, ()):  # done, or a domain the pre-pass never saw
                        continue
                    batch = pending.setdefault(key, [])
                    batch.append(seq)
                    shard_end = min((seq.seq_index // R + 1) * R, self.planned[key])
                    if len(batch) == B or seq.seq_index + 1 == shard_end:
                        self._run_batch(batch, writer)
                        pending[key] = []
                        if seq.seq_index + 1 == shard_end and shard_end % R:
                            writer.end_stream(*key)  # the stream's short last shard is complete
        finally:
            if self.progress is not None:
                self.progress.stop()
        self.stats.loop_s = time.perf_counter() - start
        self._check_corpus_unchanged(packer)

    def _check_corpus_unchanged(self, packer: Packer) -> None:
        planned = self.manifest.planned_hashes()
        got = {n: s.sha256 for n, s in packer.stats.items()}
        changed = sorted(n for n in planned.keys() | got.keys() if got.get(n) != planned.get(n))
        if changed:
            # This run's shards of those domains may hold the new text: unlist them, so the dump stays the old corpus's.
            outdir.forget_shards(self.manifest, self.out, {f for d, f in self.written if d in changed})
            self.manifest.write_atomic(self.out)
            raise UserError(
                f"--data {self.config.data}: the corpus changed while the dump was running (domains {changed}); this "
                "run's shards of those domains were discarded. Restore the corpus and rerun to finish the dump, or "
                "dump the new corpus into another --out"
            )

    def _run_batch(self, batch: list[PackedSequence], writer: ShardWriter) -> None:
        ids = torch.from_numpy(np.stack([s.input_ids for s in batch]))
        temps = tuple(self.manifest.temperatures[1:])
        hidden = self.manifest.hidden_states  # the dump's own setting (a resume keeps it)
        # ``hidden`` only when the dump stores hidden states: a backend written before the option needs no change.
        more = {"hidden": True} if hidden is not None else {}
        t = self.teacher.targets(ids, k=self.manifest.k, extra_temperatures=temps, **more)
        self.stats.forward_s += t.forward_s
        if hidden is not None and (problem := hidden_codec.range_problem(t.hidden, hidden["encoding"])) is not None:
            raise UserError(
                f"{problem} (domain '{batch[0].domain}', sequences {batch[0].seq_index}-{batch[-1].seq_index} of "
                f"{batch[0].split}, --dtype {self.config.dtype}); the complete shards are kept"
            )
        if not (np.isfinite(t.lse).all() and np.isfinite(t.topk_logits).all()):
            # Before any of it is encoded: a NaN target would poison every student trained from the dump.
            raise UserError(
                f"the teacher's logits hold NaN or inf in domain '{batch[0].domain}' (sequences "
                f"{batch[0].seq_index}-{batch[-1].seq_index} of {batch[0].split}) at --dtype {self.config.dtype}: the "
                "logits overflow in half precision, or the weights are broken. Rerun with --dtype float32 (or "
                "bfloat16); the complete shards are kept and the rerun resumes"
            )
        bos = self.manifest.bos_token_id
        if bos is not None:
            # Nothing should learn to predict BOS (it marks a document start the packing chose): no target there.
            t.nll[:, :-1][ids[:, 1:].numpy() == bos] = np.nan
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
                    None if t.hidden is None else t.hidden[b],
                )
            )
        n = ids.numel()
        self.stats.tokens[batch[0].domain] += n
        if self.progress is not None:
            self.progress.advance(batch[0].domain, n)
