"""The teacher's last hidden state per position, one compressed blob per row (``dump-teacher --store-hidden-states``).

A row's hidden states are [L, D] float32 on the teacher side (``outputs.hidden_states[-1]``: for Llama- and
Gemma-style models the state after the final norm, the one the output head multiplies). Three encodings, each a
pure function of the row (so a blob is the same bytes whichever process encodes it):

- ``fp16-bss-zstd``: float16, the two byte planes split (all high bytes, then all low bytes), zstd.
- ``bf16-bss-zstd``: bfloat16 (round to nearest even), byte planes split, zstd.
- ``int8-absmax-zstd``: per position a float32 scale ``max|h| / 127`` and int8 codes ``round(h / scale)``, zstd.

``pipelines/bench_hidden_states.py`` measures them on real text (benchmarks/results/hidden_states.md); the dump
writes :data:`DEFAULT_ENCODING`. What DSKD feeds its projector is ``h / std(h)`` (one std over the whole batch), so
the error that matters is the RMS error in units of that std, and the per-position cosine.
"""

from __future__ import annotations

import numpy as np

#: The encoding ``dump-teacher --store-hidden-states`` writes (see the module docstring for why).
DEFAULT_ENCODING = "fp16-bss-zstd"
ENCODINGS = ("fp16-bss-zstd", "bf16-bss-zstd", "int8-absmax-zstd")
#: zstd level of the blob: level 3 is within ~1% of level 9's size on hidden states at several times the speed.
ZSTD_LEVEL = 3


#: The largest finite float16: a state beyond it would be stored as inf.
FP16_MAX = 65504.0


class HiddenCodecError(ValueError):
    """A blob that does not decode to the [L, D] the manifest promises."""


def range_problem(hidden: np.ndarray, encoding: str) -> str | None:
    """Why ``hidden`` cannot be stored in ``encoding`` (non-finite, or beyond float16's range), or None."""
    peak = float(np.abs(hidden).max()) if hidden.size else 0.0
    if not np.isfinite(peak):
        return "the teacher's hidden states hold NaN or inf"
    if encoding == "fp16-bss-zstd" and peak > FP16_MAX:
        return (
            f"the teacher's hidden states reach {peak:.4g}, beyond float16's range ({FP16_MAX:g}); "
            "rerun with --hidden-encoding bf16-bss-zstd"
        )
    return None


def describe(encoding: str, dim: int) -> dict:
    """The manifest record (``settings.hidden_states``) of hidden states of width ``dim`` in ``encoding``."""
    if encoding not in ENCODINGS:
        raise ValueError(f"hidden-state encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    return {"encoding": encoding, "dim": int(dim), "zstd_level": ZSTD_LEVEL}


def encode(hidden: np.ndarray, encoding: str = DEFAULT_ENCODING, *, level: int = ZSTD_LEVEL) -> bytes:
    """One row's hidden states [L, D] (any float dtype, finite) as a blob."""
    import zstandard

    h = np.ascontiguousarray(hidden, dtype=np.float32)
    if h.ndim != 2:
        raise ValueError(f"hidden states must be [L, D], got shape {h.shape}")
    if (problem := range_problem(h, encoding)) is not None:
        raise ValueError(problem)  # never store an inf for a value the teacher computed
    if encoding == "fp16-bss-zstd":
        raw = _planes(h.astype(np.float16).view(np.uint8), 2)
    elif encoding == "bf16-bss-zstd":
        raw = _planes(_to_bf16_bits(h).view(np.uint8), 2)
    elif encoding == "int8-absmax-zstd":
        scale = (np.abs(h).max(axis=1) / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        codes = np.clip(np.rint(h / safe[:, None]), -127, 127).astype(np.int8)
        raw = scale.tobytes() + codes.tobytes()
    else:
        raise ValueError(f"hidden-state encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    return zstandard.ZstdCompressor(level=level).compress(raw)


def decode(blob: bytes, L: int, D: int, encoding: str = DEFAULT_ENCODING) -> np.ndarray:
    """A blob back to float32 [L, D].

    Raises:
        HiddenCodecError: the blob is not zstd, or holds a different number of values than L x D.
    """
    import zstandard

    width = {"fp16-bss-zstd": 2 * L * D, "bf16-bss-zstd": 2 * L * D, "int8-absmax-zstd": 4 * L + L * D}
    if encoding not in width:
        raise HiddenCodecError(f"unknown hidden-state encoding {encoding!r} (this ddk-offline knows {ENCODINGS})")
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=width[encoding])
    except zstandard.ZstdError as e:
        raise HiddenCodecError(f"hidden-state blob is not valid zstd ({e})") from None
    if len(raw) != width[encoding]:
        raise HiddenCodecError(f"hidden-state blob holds {len(raw)} bytes, expected {width[encoding]} for [{L}, {D}]")
    buf = np.frombuffer(raw, np.uint8)
    if encoding == "fp16-bss-zstd":
        return _unplanes(buf, 2).view(np.float16).astype(np.float32).reshape(L, D)
    if encoding == "bf16-bss-zstd":
        bits = _unplanes(buf, 2).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(L, D)
    scale = buf[: 4 * L].view(np.float32)
    codes = buf[4 * L :].view(np.int8).reshape(L, D)
    return codes.astype(np.float32) * scale[:, None]


def _planes(bytes_: np.ndarray, width: int) -> bytes:
    """Byte-stream split: byte j of every value together (the exponent bytes compress far better on their own)."""
    return bytes_.reshape(-1, width).T.tobytes()


def _unplanes(buf: np.ndarray, width: int) -> np.ndarray:
    return np.ascontiguousarray(buf.reshape(width, -1).T).reshape(-1)


def _to_bf16_bits(h: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (as torch's ``.to(torch.bfloat16)``)."""
    u = h.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
