"""The teacher's BOS convention: whether packed documents and rows start with a BOS token, and which one.

Many teachers (Gemma, Llama 2 and 3, Mistral) were trained on text that starts with BOS; without it their
predictions run out of distribution (Gemma-3-270M's loss per byte rises 42-54% on the demo corpus, issue #14).
Others (SmolLM2, Qwen, GPT-2) never see one. ``--bos`` chooses (docs/FORMAT.md, "BOS"):

- ``auto``: follow the tokenizer's own convention: BOS when ``tokenizer(text)`` (``add_special_tokens=True``)
  puts its ``bos_token_id`` in front, none otherwise;
- ``always``: the tokenizer's BOS token even if it does not add it (refused when it has none, or when its BOS is
  its EOS: the EOS already separates the documents);
- ``never``: no BOS, the layout of every dump written before format 3.

A resumed dump keeps the policy it was created with: ``auto`` adopts it, an explicit value that contradicts it is
refused, so one dump never mixes two layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ddk_offline.errors import UserError
from ddk_offline.format.manifest import Manifest

BOS_CHOICES = ("auto", "always", "never")
_PROBE = "a"  # any text: only the special tokens added around it matter


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of text when asked for special tokens (its own convention)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    framed = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    return framed[:1] == [bos] and plain[:1] != [bos]


@dataclass(frozen=True)
class BosPolicy:
    """The resolved policy of one dump.

    Attributes:
        requested: ``--bos`` as the dump was created with (``auto``, ``always`` or ``never``).
        token_id: the BOS id that starts each document and row; None: no BOS.
        token: the BOS token's text (None without BOS).
        tokenizer_adds_bos: the tokenizer's own convention (what ``auto`` follows, and what the start-up check's
            standard tokenisation does).
    """

    requested: str
    token_id: int | None
    token: str | None
    tokenizer_adds_bos: bool

    def record(self) -> dict[str, Any]:
        """The manifest's ``packing`` object (the start-up check is added once it has run)."""
        return {
            "bos": self.requested,
            "bos_token_id": self.token_id,
            "bos_token": self.token,
            "tokenizer_adds_bos": self.tokenizer_adds_bos,
            "row_start_bos": self.token_id is not None,
            "check": None,
        }

    def describe(self) -> str:
        """One phrase for messages, e.g. ``BOS '<bos>' at each document and row start (--bos auto)``."""
        if self.token_id is None:
            return f"no BOS (--bos {self.requested})"
        return f"BOS {self.token!r} at each document and row start (--bos {self.requested})"


def resolve_bos(requested: str, tokenizer, existing: Manifest | None = None, out: str = "") -> BosPolicy:
    """The policy of this run: ``requested`` applied to ``tokenizer``, or the policy of the dump it resumes.

    Args:
        requested: ``--bos``: ``auto``, ``always`` or ``never``.
        tokenizer: the teacher's tokenizer.
        existing: the manifest already in ``--out`` (None for a new dump).
        out: ``--out``, for messages.

    Raises:
        UserError: ``always`` without a usable BOS token, or a value that contradicts the dump being resumed.
    """
    if requested not in BOS_CHOICES:
        raise UserError(f"--bos {requested!r}: choose one of {', '.join(BOS_CHOICES)}")
    adds = tokenizer_adds_bos(tokenizer)
    if existing is not None:
        return _resumed(requested, tokenizer, existing, adds, out)
    if requested == "never" or (requested == "auto" and not adds):
        return BosPolicy(requested, None, None, adds)
    bos = tokenizer.bos_token_id
    if bos is None:
        raise UserError(
            "--bos always: the teacher's tokenizer has no BOS token (bos_token is unset); use --bos auto or never"
        )
    if bos == tokenizer.eos_token_id:
        raise UserError(
            f"--bos always: the tokenizer's BOS {tokenizer.bos_token!r} is its EOS, which already separates the "
            "packed documents (GPT-2's convention); use --bos auto or never"
        )
    return BosPolicy(requested, int(bos), str(tokenizer.bos_token), adds)


def _resumed(requested: str, tokenizer, existing: Manifest, adds: bool, out: str) -> BosPolicy:
    bos = existing.bos_token_id
    if (requested == "always" and bos is None) or (requested == "never" and bos is not None):
        raise UserError(
            f"--bos {requested}: the dump in --out {out} was made with {existing.bos_policy!r} "
            f"({'no BOS' if bos is None else f'BOS id {bos}'}), and a resume keeps the policy of the dump it "
            "resumes; rerun with --bos auto to finish it, or dump into another --out"
        )
    token = None if bos is None else tokenizer.convert_ids_to_tokens(bos)
    return BosPolicy(existing.bos_policy, bos, token, adds)
