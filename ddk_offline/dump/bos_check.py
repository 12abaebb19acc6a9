"""The start-up check: does the teacher see packed rows the way it sees text tokenised its own standard way?

A wrong special-token framing (a BOS-trained teacher packed without BOS, or the reverse) raises the teacher's loss
without any error: every stored target would come from a teacher out of distribution. Before the first shard,
``dump-teacher`` scores a few documents twice with the loaded teacher:

- packed: the first rows of each domain, cut exactly as the dump cuts them (:func:`.packing.take_row`; the
  budget's last row may be a prefix of a full one);
- standard: each document alone, tokenised with ``add_special_tokens=True`` (the tokenizer's convention).

Only tokens whose document starts in the same packed row are compared, so both sides give the token its whole
document as context and differ only in the framing (special tokens, and the preceding documents of the row);
the first token of a document counts only where both sides predict it. The losses are summed over the same tokens
and divided by the UTF-8 bytes those tokens spell. A relative difference above :data:`WARN_ABOVE` is reported
loudly by the caller (:func:`mismatch_message`); the result is stored in ``manifest.packing.check``.

Cost: at most :data:`TOKENS_PER_DOMAIN` packed tokens and as many standard ones for each of the first
:data:`DOMAINS` domains: a few teacher forwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from ddk_offline.dump.bos import BosPolicy
from ddk_offline.dump.corpus import Document
from ddk_offline.dump.packing import document_tokens, take_row

TOKENS_PER_DOMAIN = 512  # packed stream tokens scored per domain
DOCS_PER_DOMAIN = 8  # documents kept per domain (short documents: several fit the budget)
DOMAINS = 8  # the first domains in corpus order
#: Relative difference of bits per byte above which the check warns. A matching framing stays within ~1-2% (the
#: row's earlier documents are extra context); a mismatched one costs tens of percent (issue #14: 42-54%).
WARN_ABOVE = 0.05

Origin = tuple[int, int] | None  # (document, content-token index) of a stream token; None for BOS / EOS


class SampleDocuments:
    """The first documents of the first domains, kept while the pre-pass streams the corpus past them."""

    def __init__(self, docs_per_domain: int = DOCS_PER_DOMAIN, domains: int = DOMAINS):
        self.docs_per_domain, self.domains = docs_per_domain, domains
        self.texts: dict[str, list[str]] = {}

    def watch(self, documents: Iterable[Document]) -> Iterator[Document]:
        """Yield ``documents`` unchanged, keeping the samples."""
        for doc in documents:
            kept = self.texts.get(doc.domain)
            if kept is None and len(self.texts) < self.domains and doc.text.strip():
                kept = self.texts[doc.domain] = []
            if kept is not None and len(kept) < self.docs_per_domain and doc.text.strip():
                kept.append(doc.text)
            yield doc


def _rows(stream: list[int], origin: list[Origin], seq_len: int, bos: int | None):
    """The packed rows of ``stream`` with each position's origin; the last may be a prefix of a full row."""
    pos = 0
    while pos < len(stream):
        rest = stream[pos:]
        cut = take_row(rest, seq_len, bos)
        if cut is None:  # the budget's end: the prefix of the row more text would complete (causal: same outputs)
            inserted = bos is not None and rest[:1] != [bos]
            row, used = ([bos] if inserted else []) + rest, len(rest)
        else:
            row, used = cut
        inserted = len(row) > used
        yield row, ([None] if inserted else []) + origin[pos : pos + used]
        pos += used


def _nll(teacher, ids: list[int]) -> list[float]:
    """The teacher's loss at each position of one row on the next token (the last one: NaN)."""
    return teacher.targets(torch.tensor([ids], dtype=torch.long), k=1).nll[0].tolist()


def _content_offset(standard: list[int], content: list[int]) -> int | None:
    """Where the document's own tokens start inside its standard tokenisation (after any prefix specials)."""
    n = len(content)
    for s in range(0, min(len(standard) - n, 8) + 1):
        if standard[s : s + n] == content:
            return s
    return None


def packing_check(teacher, tokenizer, samples: dict[str, list[str]], *, seq_len: int, policy: BosPolicy) -> dict:
    """Score the sample documents packed and standard with the loaded ``teacher`` (see the module docstring).

    Args:
        teacher: a loaded :class:`~ddk_offline.dump.teachers.TeacherBackend`.
        tokenizer: its tokenizer.
        samples: domain -> document texts (:class:`SampleDocuments`).
        seq_len: the dump's row length L.
        policy: the dump's BOS policy.

    Returns:
        The ``manifest.packing.check`` object: ``documents``, ``tokens`` and ``bytes`` scored,
        ``packed_bits_per_byte``, ``standard_bits_per_byte``, ``relative_difference`` (packed / standard - 1; None
        when nothing could be scored), ``warn_above``, ``standard`` (what the standard side is).
    """
    bos, eos = policy.token_id, int(tokenizer.eos_token_id)
    packed_sum = standard_sum = 0.0
    n_tokens = n_bytes = n_docs = 0
    for texts in samples.values():
        content = tokenizer(texts, add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        origin: list[Origin] = []
        for i, ids in enumerate(content):
            if len(stream) >= TOKENS_PER_DOMAIN:
                break
            stream += document_tokens(ids, eos, bos)
            origin += ([None] if bos is not None else []) + [(i, j) for j in range(len(ids))] + [None]
        packed: dict[tuple[int, int], float] = {}
        for row, row_origin in _rows(stream[:TOKENS_PER_DOMAIN], origin[:TOKENS_PER_DOMAIN], seq_len, bos):
            if len(row) < 2:
                continue
            started = {o[0] for o in row_origin if o is not None and o[1] == 0}
            for n, loss in enumerate(_nll(teacher, row)[:-1]):
                o = row_origin[n + 1]
                if o is not None and o[0] in started:
                    packed[o] = loss
        for i in sorted({i for i, _ in packed}):
            standard = tokenizer(texts[i], add_special_tokens=True)["input_ids"]
            s = _content_offset(standard, content[i])
            if s is None:
                continue  # a tokenizer that changes the text's own tokens when framing it: not comparable
            # s + j < seq_len: the standard input never runs longer than the dump's rows (the teacher's limit)
            scored = sorted(j for d, j in packed if d == i and 1 <= s + j < seq_len)
            if not scored:
                continue
            std = _nll(teacher, standard[: s + scored[-1] + 1])
            packed_sum += sum(packed[(i, j)] for j in scored)
            standard_sum += sum(std[s + j - 1] for j in scored)
            n_tokens += len(scored)
            text = tokenizer.decode(content[i][scored[0] : scored[-1] + 1], clean_up_tokenization_spaces=False)
            n_bytes += len(text.encode("utf-8"))
            n_docs += 1
    per_byte = (lambda x: x / n_bytes / math.log(2)) if n_bytes else (lambda x: None)
    packed_bpb, standard_bpb = per_byte(packed_sum), per_byte(standard_sum)
    return {
        "documents": n_docs,
        "tokens": n_tokens,
        "bytes": n_bytes,
        "packed_bits_per_byte": packed_bpb,
        "standard_bits_per_byte": standard_bpb,
        "relative_difference": packed_bpb / standard_bpb - 1 if standard_bpb else None,
        "warn_above": WARN_ABOVE,
        "standard": "each document alone, add_special_tokens=True"
        + (" (BOS first)" if policy.tokenizer_adds_bos else " (no BOS added)"),
    }


def mismatch_message(check: dict, policy: BosPolicy) -> str | None:
    """The loud warning for a check whose packed and standard losses differ by more than its threshold, else None."""
    rel = check.get("relative_difference")
    if rel is None or abs(rel) <= check.get("warn_above", WARN_ABOVE):
        return None
    if policy.token_id is None and policy.tokenizer_adds_bos:
        fix = "dump with --bos auto (the tokenizer frames text with its BOS)"
    elif policy.token_id is not None and not policy.tokenizer_adds_bos:
        fix = "dump with --bos auto or never (the tokenizer adds no BOS)"
    else:
        fix = (
            "the teacher may expect a framing its tokenizer does not declare: compare --bos always and --bos never "
            "(each dump's `dumps info` shows this check)"
        )
    return (
        f"the teacher's loss per byte on packed rows ({policy.describe()}) is {rel:+.1%} off its loss on the same "
        f"documents tokenised the standard way ({check['standard']}): {check['packed_bits_per_byte']:.3f} vs "
        f"{check['standard_bits_per_byte']:.3f} bits/byte over {check['tokens']} tokens of {check['documents']} "
        "documents. Targets stored with this framing describe a teacher running out of distribution, and every "
        f"student distilled from them learns that. Fix: {fix}, into a new --out (a resume keeps the policy of the "
        "dump it resumes)"
    )
