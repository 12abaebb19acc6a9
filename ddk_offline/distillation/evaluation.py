"""Per-domain evaluation on a dump's validation shards: each model's loss and perplexity against the teacher's.

For every domain the student's cross-entropy is averaged over the labelled positions of the val sequences, and
the teacher's stored NLL over exactly the same positions (from the dump, so the teacher never runs again).
The ratio per domain is the perplexity ratio PPL_S / PPL_T = exp(CE_S - NLL_T), DDK's gap signal; 1.0 means the
student matches the teacher there. The summary is the mean over domains and the worst (largest) domain ratio.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddk_offline.distillation.data import IGNORE_INDEX, collate
from ddk_offline.format.reader import DumpReader
from ddk_offline.format.schema import INPUT_IDS, ROW_GROUP_ROWS, TEACHER_LSE, TEACHER_NLL
from ddk_offline.format.workers import RowDecoder, auto_workers
from ddk_offline.runtime.device import autocast, resolve_device


@dataclass
class DomainEval:
    """One domain's numbers. Losses are nats per labelled position; ``ratio`` is PPL_S / PPL_T."""

    domain: str
    sequences: int
    positions: int
    loss: float
    ppl: float
    teacher_loss: float
    teacher_ppl: float
    ratio: float
    loss_ratio: float


@dataclass
class EvalResult:
    """A model's evaluation: per-domain rows plus the mean and worst-domain ratio."""

    model: str
    split: str
    domains: list[DomainEval] = field(default_factory=list)

    @property
    def measured(self) -> list[DomainEval]:
        return [d for d in self.domains if d.positions > 0]

    @property
    def mean_ratio(self) -> float:
        r = [d.ratio for d in self.measured]
        return float(np.mean(r)) if r else math.nan

    @property
    def worst(self) -> DomainEval | None:
        return max(self.measured, key=lambda d: d.ratio, default=None)

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "model": self.model,
            "split": self.split,
            "domains": {d.domain: asdict(d) for d in self.domains},
            "mean_ratio": self.mean_ratio,
            "worst_ratio": worst.ratio if worst else math.nan,
            "worst_domain": worst.domain if worst else None,
        }


@torch.no_grad()
def domain_sums(
    model: torch.nn.Module,
    reader: DumpReader,
    *,
    split: str = "val",
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    max_sequences: int | None = None,
    data_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Student CE and teacher NLL sums per domain over the same positions.

    ``data_workers`` processes read the val rows ahead of the model (0: in this thread; the sums are the same).

    Returns:
        ``(sums [3, N] float64 rows ce_sum, nll_sum, positions; sequences [N] int64)``, N = ``reader.domains``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = np.zeros((3, len(reader.domains)), np.float64)
    seqs = np.zeros(len(reader.domains), np.int64)
    decoder = RowDecoder(reader, data_workers)
    bos = reader.manifest.bos_token_id
    try:
        for d, name in enumerate(reader.domains):
            for rows in _batches(reader, decoder, name, split, batch_size, max_sequences):
                sums[:, d] += _batch_sums(model, rows, device, bos)
                seqs[d] += len(rows[INPUT_IDS])
    finally:
        decoder.close()
        model.train(was_training)
    return sums, seqs


def _batches(reader: DumpReader, decoder: RowDecoder, domain: str, split: str, batch_size: int, limit: int | None):
    """The split's sequences in order, ``batch_size`` at a time (the last batch shorter), without the top-k.

    Row groups are asked for ahead (two per worker), so the workers decode while the model evaluates.
    """
    chunks = []
    for shard, info in enumerate(reader.shards(domain, split)):
        for start in range(0, info.rows, ROW_GROUP_ROWS):
            chunks.append((shard, list(range(start, min(start + ROW_GROUP_ROWS, info.rows)))))
    total = sum(len(r) for _, r in chunks)
    total = total if limit is None else min(limit, total)
    ahead = max(1, 2 * decoder.workers)
    asked = deque()
    buffer: dict[str, list[np.ndarray]] = {k: [] for k in _EVAL_KEYS}
    held = taken = 0
    for shard, rows in chunks:
        if taken >= total:
            break
        rows = rows[: total - taken]
        taken += len(rows)
        asked.append(decoder.submit(domain, split, shard, rows, decode_topk=False))
        while len(asked) >= ahead or (taken >= total and asked):
            data = decoder.result(asked.popleft())
            for k in _EVAL_KEYS:
                buffer[k].extend(data[k])
            held += len(data[INPUT_IDS])
            while held >= batch_size:
                yield {k: np.stack(v[:batch_size]) for k, v in buffer.items()}
                buffer = {k: v[batch_size:] for k, v in buffer.items()}
                held -= batch_size
    if held:
        yield {k: np.stack(v) for k, v in buffer.items()}


_EVAL_KEYS = (INPUT_IDS, TEACHER_LSE, TEACHER_NLL)


def _batch_sums(
    model: torch.nn.Module, stacked: dict[str, np.ndarray], device: torch.device, bos: int | None
) -> np.ndarray:
    n = len(stacked[INPUT_IDS])
    batch = collate(stacked, np.zeros(n, np.int64), lse_key=TEACHER_LSE, with_topk=False, bos_id=bos)
    batch = batch.to(device)
    with autocast(device):
        logits = model(input_ids=batch.input_ids).logits
    flat = logits.float().reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, batch.labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    mask = batch.labels != IGNORE_INDEX
    return np.array([float(ce), float(batch.teacher_nll[mask].double().sum()), float(mask.sum())])


def summarise(model_name: str, domains: list[str], sums: np.ndarray, seqs: np.ndarray, split: str) -> EvalResult:
    """Turn per-domain sums ([3, N]: ce, nll, positions) into an :class:`EvalResult`."""
    result = EvalResult(model=model_name, split=split)
    for d, name in enumerate(domains):
        ce_sum, nll_sum, n = sums[:, d]
        loss = ce_sum / n if n else math.nan
        tl = nll_sum / n if n else math.nan
        result.domains.append(
            DomainEval(
                domain=name,
                sequences=int(seqs[d]),
                positions=int(n),
                loss=loss,
                ppl=_exp(loss),
                teacher_loss=tl,
                teacher_ppl=_exp(tl),
                ratio=_exp(loss - tl),
                loss_ratio=loss / tl if n and tl > 0 else math.nan,
            )
        )
    return result


def _exp(x: float) -> float:
    if math.isnan(x):
        return math.nan
    return math.exp(min(x, 700.0))  # a diverged model reports a huge, finite perplexity


def evaluate_model(
    model: torch.nn.Module,
    reader: DumpReader,
    *,
    name: str = "model",
    split: str = "val",
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    max_sequences: int | None = None,
    data_workers: int = 0,
) -> EvalResult:
    """Evaluate a loaded model on every domain of ``reader`` (see the module docstring)."""
    sums, seqs = domain_sums(
        model,
        reader,
        split=split,
        batch_size=batch_size,
        device=device,
        max_sequences=max_sequences,
        data_workers=data_workers,
    )
    return summarise(name, reader.domains, sums, seqs, split)


def evaluate(
    dump: str | os.PathLike,
    models: list[str],
    *,
    split: str = "val",
    batch_size: int = 8,
    device: str = "auto",
    max_sequences: int | None = None,
    data_workers: int | None = None,
    say: Callable[[str], None] | None = None,
) -> list[EvalResult]:
    """Load each model (a ``save_pretrained`` folder or a ``.gguf`` file) and evaluate it on the dump.

    ``data_workers`` processes read the val rows (None: :func:`~ddk_offline.format.workers.auto_workers`; 0: in this
    thread); the numbers do not depend on it. ``say`` gets a status line as each model loads and is evaluated.

    Raises:
        UserError: no sequences in ``split``, or a model whose vocabulary does not fit the dump.
    """
    from ddk_offline.distillation.student import StudentMismatchError, check_fits, load_student
    from ddk_offline.errors import UserError
    from ddk_offline.format.reader import open_dump

    reader = open_dump(dump)
    if not any(reader.num_sequences(d, split) for d in reader.domains):
        raise UserError(f"{dump}: the dump has no {split!r} sequences in any domain; re-dump with a val fraction > 0")
    dev = resolve_device(device)
    workers = auto_workers() if data_workers is None else int(data_workers)
    results = []
    for i, path in enumerate(models, 1):
        if say is not None:
            say(f"[{i}/{len(models)}] loading {path}")
        try:
            model = load_student(pretrained=path)
        except (OSError, ValueError) as e:
            raise UserError(f"--model {path}: cannot load it as a causal LM ({e})") from None
        try:
            check_fits(model, reader.manifest, dump)
        except StudentMismatchError as e:
            raise UserError(f"--model {path}: {e}") from None
        model.to(dev)
        if say is not None:
            say(f"[{i}/{len(models)}] evaluating on the {split} split of {dump}")
        results.append(
            evaluate_model(
                model,
                reader,
                name=str(path),
                split=split,
                batch_size=batch_size,
                device=dev,
                max_sequences=max_sequences,
                data_workers=workers,
            )
        )
        del model
    return results
