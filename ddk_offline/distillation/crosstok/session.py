"""One cross-tokenizer run's shared state: both vocabularies, the cached student rows, the method, the loss step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddk_offline.distillation.crosstok import dskd  # noqa: F401  (registers the method)
from ddk_offline.distillation.crosstok.batch import IGNORE_INDEX, StudentBatch, student_batch
from ddk_offline.distillation.crosstok.methods import METHODS
from ddk_offline.distillation.crosstok.rows import StudentRows, default_cache_root, load_or_build
from ddk_offline.distillation.crosstok.vocab_bytes import VocabBytes, dump_vocab_bytes, vocab_bytes
from ddk_offline.errors import UserError
from ddk_offline.format.reader import DumpReader
from ddk_offline.format.schema import TEACHER_HIDDEN
from ddk_offline.runtime.device import autocast
from ddk_offline.runtime.quiet import quiet_loading


def load_tokenizer(source: str | Path) -> Any:
    """The tokenizer of a ``save_pretrained`` folder, a hub name or a ``.gguf`` file."""
    from transformers import AutoTokenizer

    path = Path(source)
    try:
        with quiet_loading():
            if path.suffix == ".gguf":
                return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a tokenizer from {source} ({e}); pass --student-tokenizer PATH (a folder with the "
            "student's tokenizer files, or its .gguf)"
        ) from None


class CrossTokenizer:
    """Everything a cross-tokenizer run or evaluation needs besides the model.

    Args:
        reader: the dump.
        tokenizer: the student's tokenizer.
        method: a :data:`~.methods.METHODS` name (None for evaluation only).
        cache_root: where the student rows are cached (None: :func:`~.rows.default_cache_root` of ``out``).
        out: the run's folder (the cache's fallback place).
        say: status lines (building the rows, the alignment rates).
    """

    def __init__(
        self,
        reader: DumpReader,
        tokenizer: Any,
        *,
        method: str | None = None,
        cache_root: str | Path | None = None,
        out: str | Path = ".",
        say: Callable[[str], None] = lambda _: None,
    ) -> None:
        if method is not None and method not in METHODS:
            raise UserError(f"--cross-tokenizer {method!r}: unknown; choose one of {', '.join(sorted(METHODS))}")
        self.reader, self.tokenizer = reader, tokenizer
        self.teacher: VocabBytes = dump_vocab_bytes(reader)
        self.student: VocabBytes = vocab_bytes(tokenizer)
        root = Path(cache_root) if cache_root else default_cache_root(reader, out)
        say(f"aligning the dump's rows with the student's tokenizer (once per tokenizer pair; cache in {root})")
        self.rows: StudentRows = load_or_build(reader, self.teacher, self.student, self._tokenize, root)
        for split, per in self.rows.alignment.items():
            for domain, a in per.items():
                if a.rows:
                    say(
                        f"  {split}/{domain}: {a.rate:.1%} of teacher positions paired, "
                        f"{a.refused} of {a.rows} rows refused"
                    )
        self.method = METHODS[method](self.teacher, self.student) if method else None
        if self.method is not None:
            self.method.bind(reader, say)  # dskd: loads the teacher matrices, or refuses naming the command
        self._hidden_reader: DumpReader | None = None
        self.pad_id = self.student.eos if self.student.eos is not None else 0

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    @property
    def same_vocabulary(self) -> bool:
        return self.teacher.sha256 == self.student.sha256

    def check_student(self, model: torch.nn.Module, what: str = "the student") -> None:
        """Refuse a model whose embeddings or context cannot hold the student rows."""
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < len(self.tokenizer):
            raise UserError(
                f"{what} has {rows} embedding rows but its tokenizer has {len(self.tokenizer)} tokens; pass the "
                "tokenizer the model was trained with (--student-tokenizer)"
            )
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if isinstance(max_pos, int) and max_pos < self.rows.seq_len:
            raise UserError(
                f"{what}'s max_position_embeddings is {max_pos} but the dump's rows take up to {self.rows.seq_len} "
                "student tokens; use a student with a longer context or a dump with shorter rows"
            )

    def batch(self, plan: np.ndarray, split: str = "train") -> StudentBatch:
        """The student rows of a plan [B, 3] (domain index, shard, row)."""
        rows = [self.rows.row(self.reader.domains[int(d)], split, int(s), int(r)) for d, s, r in plan]
        out = student_batch(rows, teacher_len=self.reader.seq_len, pad_id=self.pad_id, bos_id=self.student.bos)
        if split == "train" and getattr(self.method, "with_t2s", False):
            out.teacher_hidden = torch.from_numpy(self._teacher_hidden(plan))
        return out

    def _teacher_hidden(self, plan: np.ndarray) -> np.ndarray:
        """[B, L, D] float32 teacher hidden states of a plan's train rows (read in the loader's thread, own reader)."""
        if self._hidden_reader is None:
            self._hidden_reader = DumpReader(self.reader.store, self.reader.manifest)
        m = self.reader.manifest
        out = np.empty((len(plan), m.seq_len, int(m.hidden_states["dim"])), np.float32)
        for d, s in sorted({(int(d), int(s)) for d, s, _ in plan}):
            where = np.flatnonzero((plan[:, 0] == d) & (plan[:, 1] == s))
            rows = self._hidden_reader.read_rows(
                self.reader.domains[d], "train", s, plan[where, 2].tolist(), decode_topk=False, hidden=True
            )
            out[where] = rows[TEACHER_HIDDEN]
        return out

    def attach(self, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
        """Give the method's own trainable parts (dskd's projectors) to the optimiser, on ``device``."""
        if self.method is not None:
            self.method.attach(model, opt, device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's trainable state for a checkpoint (dskd's projectors; empty for the others)."""
        return self.method.state_dict() if self.method is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.method is not None and state:
            self.method.load_state_dict(state)

    def loss_step(self, model: torch.nn.Module, batch: Any, spec: Any, positions: int, total: int) -> dict[str, Any]:
        """:func:`~ddk_offline.distillation.loss.loss_step` for a cross-tokenizer batch; per-domain sums per byte."""
        sb = batch.student
        hidden = spec.uses_teacher and getattr(self.method, "needs_hidden", False)
        with autocast(sb.input_ids.device):
            out = model(input_ids=sb.input_ids, output_hidden_states=True) if hidden else model(input_ids=sb.input_ids)
        logits = out.logits
        B, Ls, V = logits.shape
        flat = logits.reshape(B * Ls, V)
        ce = F.cross_entropy(flat.float(), sb.labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
        extra = {"hidden": out.hidden_states[-1], "model": model} if hidden else {}
        kd, kd_value = self.method.kd(flat, batch, spec, **extra) if spec.uses_teacher else (None, 0.0)
        n = max(positions, 1)
        loss = (spec.alpha * ce.sum() + (kd if kd is not None else 0.0)) / n
        (loss * (positions / max(total, 1))).backward()
        ce = ce.detach().reshape(B, Ls)
        return {
            "loss": float(loss.detach()) * positions,
            "ce": float(ce.sum()),
            "kl": kd_value,
            "positions": positions,
            # DDK compares per byte over the same bytes: student CE and teacher NLL over each row's scored span.
            "row_ce": (ce * sb.scored_student).sum(1),
            "row_nll": (batch.teacher_nll.double() * sb.scored_teacher).sum(1),
            "row_n": sb.nbytes,
        }

    @torch.no_grad()
    def eval_sums(self, model: torch.nn.Module, batch: Any, device: torch.device) -> np.ndarray:
        """[7] sums of one val batch (evaluation's ``SUM_ROWS``): student CE, teacher NLL, student positions, student
        CE over the scored bytes, teacher NLL over the same bytes, those bytes, teacher positions."""
        sb = batch.student.to(device)
        with autocast(device):
            logits = model(input_ids=sb.input_ids).logits
        flat = logits.float().reshape(-1, logits.shape[-1])
        ce = F.cross_entropy(flat, sb.labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
        ce = ce.reshape(sb.labels.shape)
        t_mask = batch.labels != IGNORE_INDEX
        return np.array(
            [
                float(ce.sum()),
                float(batch.teacher_nll[t_mask].double().sum()),
                float((sb.labels != IGNORE_INDEX).sum()),
                float((ce * sb.scored_student).sum()),
                float((batch.teacher_nll.double() * sb.scored_teacher.cpu()).sum()),
                float(sb.nbytes.sum()),
                float(t_mask.sum()),
            ]
        )

    def log_fields(self) -> dict[str, float]:
        return self.method.log_fields() if self.method is not None else {}
