"""Per-domain evaluation on a dump's validation shards: each model's loss and perplexity against the teacher's.

For every domain the student's cross-entropy is averaged over the labelled positions of the val sequences, and
the teacher's stored NLL over exactly the same positions (from the dump, so the teacher never runs again).
The ratio per domain is the perplexity ratio PPL_S / PPL_T = exp(CE_S - NLL_T), DDK's gap signal; 1.0 means the
student matches the teacher there. The summary is the mean over domains and the worst (largest) domain ratio.

Every model is also measured in bits per byte over the same bytes as the teacher (``student_bpb``, ``teacher_bpb``,
``bpb_ratio``): for a model with the dump's tokenizer, over the labelled positions whose targets are bytes (special
tokens such as EOS are not); for a model with another tokenizer (see :mod:`.crosstok`), over each row's span that
both tokenisations cover from a common boundary to a common boundary. For such a model ``ratio`` is the per-byte
perplexity ratio exp((CE_S - NLL_T) / bytes), and ``loss``/``positions`` are per student token.
"""

from __future__ import annotations

import functools
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
    student_bpb: float = math.nan
    teacher_bpb: float = math.nan
    bpb_ratio: float = math.nan


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
    cross: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Student CE and teacher NLL sums per domain over the same positions, and over the same bytes.

    ``data_workers`` processes read the val rows ahead of the model (0: in this thread; the sums are the same).
    ``cross``: a :class:`~.crosstok.session.CrossTokenizer` for a model with another tokenizer than the dump's.

    Returns:
        ``(sums [7, N] float64, sequences [N] int64)``, N = ``reader.domains``; the rows of ``sums`` are
        :data:`SUM_ROWS` (positions are the model's; ``teacher_positions`` the dump's).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = np.zeros((len(SUM_ROWS), len(reader.domains)), np.float64)
    seqs = np.zeros(len(reader.domains), np.int64)
    decoder = RowDecoder(reader, data_workers)
    bos = reader.manifest.bos_token_id
    piece_len = None if cross is not None else _piece_lengths(reader)
    try:
        for d, name in enumerate(reader.domains):
            for rows in _batches(reader, decoder, name, split, batch_size, max_sequences):
                if cross is None:
                    sums[:, d] += _batch_sums(model, rows, device, bos, piece_len)
                else:
                    where = rows.pop(_WHERE)
                    plan = np.concatenate([np.full((len(where), 1), d), where], axis=1)
                    batch = collate(rows, plan[:, 0], lse_key=TEACHER_LSE, with_topk=False, bos_id=bos)
                    batch.student = cross.batch(plan, split)
                    sums[:, d] += cross.eval_sums(model, batch, device)
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
        asked.append(((shard, np.asarray(rows)), decoder.submit(domain, split, shard, rows, decode_topk=False)))
        while len(asked) >= ahead or (taken >= total and asked):
            shard_of, data = asked.popleft()
            data = decoder.result(data)
            data[_WHERE] = np.stack([np.full(len(data[INPUT_IDS]), shard_of[0]), shard_of[1]], axis=1)
            for k in _EVAL_KEYS:
                buffer[k].extend(data[k])
            held += len(data[INPUT_IDS])
            while held >= batch_size:
                yield {k: np.stack(v[:batch_size]) for k, v in buffer.items()}
                buffer = {k: v[batch_size:] for k, v in buffer.items()}
                held -= batch_size
    if held:
        yield {k: np.stack(v) for k, v in buffer.items()}


_WHERE = "_where"  # (shard, row) of each yielded row: cross-tokenizer evaluation looks up the student's rows
_EVAL_KEYS = (INPUT_IDS, TEACHER_LSE, TEACHER_NLL, _WHERE)
#: The rows of :func:`domain_sums`' sums.
SUM_ROWS = ("ce", "nll", "positions", "ce_bytes", "nll_bytes", "bytes", "teacher_positions")


@functools.lru_cache(maxsize=4)  # a run evaluates every eval_every steps: read a 262k vocabulary once per reader
def _piece_lengths(reader: DumpReader) -> torch.Tensor | None:
    """Bytes of each id of the dump's vocabulary [V] (None when the tokenizer's family is not known: no BPB)."""
    from ddk_offline.distillation.crosstok.vocab_bytes import dump_vocab_bytes
    from ddk_offline.errors import UserError

    try:
        pieces = dump_vocab_bytes(reader).pieces
    except UserError:
        return None
    lengths = torch.zeros(max(len(pieces), reader.manifest.vocab_size), dtype=torch.float64)
    lengths[: len(pieces)] = torch.tensor([len(p) for p in pieces], dtype=torch.float64)
    return lengths


def _batch_sums(
    model: torch.nn.Module, stacked: dict[str, np.ndarray], device: torch.device, bos: int | None, piece_len
) -> np.ndarray:
    n = len(stacked[INPUT_IDS])
    stacked = {k: v for k, v in stacked.items() if k != _WHERE}
    batch = collate(stacked, np.zeros(n, np.int64), lse_key=TEACHER_LSE, with_topk=False, bos_id=bos)
    batch = batch.to(device)
    with autocast(device):
        logits = model(input_ids=batch.input_ids).logits
    flat = logits.float().reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, batch.labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce.double().reshape(batch.labels.shape).cpu()
    mask = (batch.labels != IGNORE_INDEX).cpu()
    nll = batch.teacher_nll.double().cpu()
    out = [float(ce.sum()), float(nll[mask].sum()), float(mask.sum())]
    if piece_len is None:
        return np.array([*out, math.nan, math.nan, math.nan, out[2]])
    nbytes = torch.where(mask, piece_len[batch.labels.cpu().clamp_min(0)], 0.0)
    has = nbytes > 0
    return np.array([*out, float(ce[has].sum()), float(nll[has].sum()), float(nbytes.sum()), out[2]])


def summarise(
    model_name: str, domains: list[str], sums: np.ndarray, seqs: np.ndarray, split: str, cross: bool = False
) -> EvalResult:
    """Turn per-domain sums ([7, N], :data:`SUM_ROWS`) into an :class:`EvalResult`.

    ``cross``: the model has another tokenizer than the dump's, so its ratios are per byte.
    """
    result = EvalResult(model=model_name, split=split)
    for d, name in enumerate(domains):
        ce_sum, nll_sum, n, ce_b, nll_b, nbytes, tn = sums[:, d]
        loss = ce_sum / n if n else math.nan
        tl = nll_sum / tn if tn else math.nan
        s_bpb, t_bpb = (ce_b / nbytes / math.log(2), nll_b / nbytes / math.log(2)) if nbytes > 0 else (math.nan,) * 2
        if cross:
            ratio, loss_ratio = _exp((ce_b - nll_b) / nbytes) if nbytes > 0 else math.nan, s_bpb / t_bpb
        else:
            ratio, loss_ratio = _exp(loss - tl), loss / tl if n and tl > 0 else math.nan
        result.domains.append(
            DomainEval(
                domain=name,
                sequences=int(seqs[d]),
                positions=int(n),
                loss=loss,
                ppl=_exp(loss),
                teacher_loss=tl,
                teacher_ppl=_exp(tl),
                ratio=ratio,
                loss_ratio=loss_ratio,
                student_bpb=s_bpb,
                teacher_bpb=t_bpb,
                bpb_ratio=s_bpb / t_bpb if t_bpb > 0 else math.nan,
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
    cross: Any = None,
) -> EvalResult:
    """Evaluate a loaded model on every domain of ``reader`` (see the module docstring; ``cross`` as there)."""
    sums, seqs = domain_sums(
        model,
        reader,
        split=split,
        batch_size=batch_size,
        device=device,
        max_sequences=max_sequences,
        data_workers=data_workers,
        cross=cross,
    )
    return summarise(name, reader.domains, sums, seqs, split, cross=cross is not None)


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
        cross = _cross_for(path, reader, say)
        try:
            if cross is None:
                check_fits(model, reader.manifest, dump)
            else:
                cross.check_student(model, f"--model {path}")
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
                cross=cross,
            )
        )
        del model
    return results


def _cross_for(path: str, reader: DumpReader, say: Callable[[str], None] | None) -> Any:
    """The cross-tokenizer evaluation state for a model whose tokenizer differs from the dump's (None: the same, or
    the model has no tokenizer of its own, so it must read the dump's)."""
    from pathlib import Path

    from ddk_offline.distillation.crosstok.session import CrossTokenizer, load_tokenizer
    from ddk_offline.distillation.crosstok.vocab_bytes import dump_vocab_bytes, vocab_bytes
    from ddk_offline.errors import UserError

    try:
        tokenizer = load_tokenizer(path)
    except UserError:
        return None
    try:
        if vocab_bytes(tokenizer).sha256 == dump_vocab_bytes(reader).sha256:
            return None
    except UserError:
        return None  # a tokenizer family alignment cannot read: evaluated as the dump's vocabulary (checked)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddk-offline"
    return CrossTokenizer(reader, tokenizer, out=cache, say=say or (lambda _: None))
