"""The exact bytes each token id stands for, read from the tokenizer's own vocabulary (never from ``decode()``).

Cross-tokenizer alignment compares two tokenisations of the same text byte for byte, so every id needs its byte
string. ``decode()`` on a single id is wrong for exactly the pieces that matter: a byte-fallback piece ``<0xE2>`` or a
byte-level piece holding half of a UTF-8 character decodes to U+FFFD, and SentencePiece decoders strip the leading
space of a lone ``▁word``. The two families are read from their vocabularies instead:

- byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM): every piece is written in the 256-character byte alphabet
  (printable bytes as themselves, the others shifted to U+0100...), mapped back here byte by byte;
- SentencePiece-style BPE (Llama-2, Gemma, Mistral): ``▁`` is a space and ``<0xNN>`` is the byte NN (byte fallback);
  other pieces are their UTF-8.

Special tokens (BOS, EOS, padding, chat markers) stand for no bytes. Added tokens that are not special are matched
literally in text, so they stand for their content's UTF-8.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from ddk_offline.errors import UserError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level BPE alphabet (the printable bytes keep their code point)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


_ALPHABET = _byte_alphabet()


@dataclass(frozen=True)
class VocabBytes:
    """The byte strings of a tokenizer's ids, and what alignment needs to know about its special tokens.

    Attributes:
        pieces: ``pieces[i]`` is the bytes id ``i`` stands for (``b""`` for special tokens).
        family: ``byte-level`` or ``sentencepiece``.
        special: ids of special tokens (no bytes).
        unknown: ids that stand for text the vocabulary cannot hold (a row holding one cannot be rebuilt).
        eos: the EOS id (documents end with it), or None.
        bos: the BOS id the tokenizer puts in front of text, or None when it adds none.
        sha256: a hash of everything above: the key of the student rows built with it.
        fallback: ids of byte-fallback pieces ``<0xNN>`` (a second spelling of bytes that have a plain piece too).
    """

    pieces: tuple[bytes, ...]
    family: str
    special: frozenset[int]
    unknown: frozenset[int]
    eos: int | None
    bos: int | None
    sha256: str
    fallback: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.pieces)


def tokenizer_family(tokenizer: Any) -> str:
    """``byte-level`` or ``sentencepiece``, from the fast tokenizer's decoder; a clear error for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"cross-tokenizer alignment needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}; "
            "load it with use_fast=True or convert it with transformers"
        )
    spec = json.loads(backend.to_str())
    decoders = _flatten(spec.get("decoder"))
    kinds = {d.get("type") for d in decoders}
    if "ByteLevel" in kinds:
        return "byte-level"
    spaces = any(d.get("type") == "Replace" and "▁" in json.dumps(d, ensure_ascii=False) for d in decoders)
    if "Metaspace" in kinds or spaces:
        return "sentencepiece"
    raise UserError(
        f"cross-tokenizer alignment does not know tokenizer {type(tokenizer).__name__} (decoder types "
        f"{sorted(k for k in kinds if k)}): it reads byte-level BPE and SentencePiece-style vocabularies; "
        "open an issue with the tokenizer's name"
    )


def _flatten(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [d for sub in decoder.get("decoders", []) for d in _flatten(sub)]
    return [decoder]


def vocab_bytes(tokenizer: Any) -> VocabBytes:
    """Read the byte string of every id of ``tokenizer`` (``len(tokenizer)`` ids, added tokens included).

    Raises:
        UserError: a tokenizer family alignment cannot read (see :func:`tokenizer_family`).
    """
    family = tokenizer_family(tokenizer)
    n = len(tokenizer)
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special = {int(i) for i in tokenizer.all_special_ids} | {i for i, t in added.items() if getattr(t, "special", 0)}
    unk = getattr(tokenizer, "unk_token_id", None)
    pieces: list[bytes] = []
    fallback: set[int] = set()
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if i in special or piece is None:
            pieces.append(b"")
        elif i in added:
            pieces.append(str(added[i].content).encode("utf-8"))
        elif family == "byte-level":
            pieces.append(_from_alphabet(piece))
        else:
            m = _BYTE_PIECE.match(piece)
            if m:
                fallback.add(i)
            pieces.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
    bos = _added_bos(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    unknown = frozenset({unk} if unk is not None else set())
    digest = hashlib.sha256()
    digest.update(json.dumps([family, sorted(special), sorted(unknown), eos, bos]).encode())
    for p in pieces:
        digest.update(len(p).to_bytes(2, "little") + p)
    return VocabBytes(
        tuple(pieces), family, frozenset(special), unknown, eos, bos, digest.hexdigest(), frozenset(fallback)
    )


def _from_alphabet(piece: str) -> bytes:
    try:
        return bytes(_ALPHABET[c] for c in piece)
    except KeyError:  # a piece outside the byte alphabet (a hand-added token): its text is its bytes
        return piece.encode("utf-8")


def _added_bos(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer puts in front of text when asked for special tokens (None: it adds none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


@functools.lru_cache(maxsize=4)
def dump_vocab_bytes(reader: Any) -> VocabBytes:
    """:func:`vocab_bytes` of a dump's tokenizer, once per reader (loading Gemma's tokenizer alone takes seconds)."""
    return vocab_bytes(reader.tokenizer())
