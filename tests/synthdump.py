"""A synthetic teacher dump (random top-k targets, real shard format, the tiny tokenizer) for fast phase-two tests.

No teacher runs: rows are random but valid (top-k ids are the k largest of a random logit row, lse and NLL are
exact for that row), so the trainer, data streams and evaluation see a real dump in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddk_offline.format.codec import TopKCodec
from ddk_offline.format.manifest import DomainInfo, Manifest
from ddk_offline.format.schema import TOKENIZER_DIR
from ddk_offline.format.writer import SequenceRecord, ShardWriter

DEFAULT_COUNTS = {("code", "train"): 40, ("code", "val"): 4, ("numbers", "train"): 24, ("numbers", "val"): 4,
                  ("prose", "train"): 70, ("prose", "val"): 4}  # fmt: skip


def _record(domain, split, i, vocab, seq_len, k, rng, temps, bias):
    logits = rng.standard_normal((seq_len, vocab)) * 2.0
    logits[:, bias] += 4.0  # each domain prefers a few tokens, so per-domain losses differ
    ids = rng.choice(bias, size=seq_len)
    lse = np.log(np.exp(logits).sum(1))
    top = np.argsort(-logits, axis=1)[:, :k]
    nll = lse[:-1] - logits[np.arange(seq_len - 1), ids[1:]]
    nll = np.append(nll, np.nan).astype(np.float32)
    extra = {t: np.log(np.exp(logits / t).sum(1)).astype(np.float32) for t in temps}
    return SequenceRecord(domain, split, i, ids, top, np.take_along_axis(logits, top, 1).astype(np.float32),
                          lse.astype(np.float32), nll, extra)  # fmt: skip


def write_synth_dump(
    root: Path,
    tokenizer,
    *,
    counts: dict[tuple[str, str], int] | None = None,
    seq_len: int = 16,
    k: int = 8,
    rows_per_shard: int = 20,
    temps: tuple[float, ...] = (),
    teacher_name: str = "synthetic",
    seed: int = 0,
) -> Path:
    """Write a complete dump into ``root`` and return it. ``tokenizer`` is saved as the dump's tokenizer."""
    counts = counts or DEFAULT_COUNTS
    vocab = len(tokenizer)
    rng = np.random.default_rng(seed)
    codec = TopKCodec(vocab_size=vocab, k=k)
    names = sorted({d for d, _ in counts})
    manifest = Manifest(
        teacher={"name": teacher_name}, tokenizer={"vocab_size": vocab, "tokens": vocab}, seq_len=seq_len, k=k,
        codec=codec.describe(), corpus={}, settings={}, temperatures=[1.0, *temps],
        domains={d: DomainInfo(d, d) for d in names},
    )  # fmt: skip
    biases = {d: rng.choice(vocab, size=5 + 10 * i, replace=False) for i, d in enumerate(names)}

    def on_shard(domain, split, index, info):
        manifest.domains[domain].splits[split].shards.append(info)

    with ShardWriter(root, codec=codec, rows_per_shard=rows_per_shard, on_shard=on_shard,
                     domain_dirs={d: d for d in names}, extra_temperatures=temps) as w:  # fmt: skip
        for (domain, split), n in sorted(counts.items()):
            for i in range(n):
                w.put(_record(domain, split, i, vocab, seq_len, k, rng, temps, biases[domain]))
    tokenizer.save_pretrained(root / TOKENIZER_DIR)
    manifest.complete = True
    manifest.write_atomic(root)
    return root
