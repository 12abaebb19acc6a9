"""Integer and value primitives of the top-k codec (docs/CODEC.md): the companded value grid and the
Exp-Golomb split of integers into entropy-coded symbol bytes and raw bit fields."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ddk_offline.format.codec_config import CodecConfig

_LAMBDA_CAP = 40.0  # |logit of top-k mass| clamp (fp32 rows can report mass 1 exactly)
_D_CAP = 80.0  # nats below the top entry; beyond, an entry's probability is < e^-80 and only its rank matters


# ----------------------------------------------------------------------------------------------------------
# Companded value grid: step(d) = min(step_top * exp(d / 2), step_max).
def _grid_knee(cfg: CodecConfig) -> tuple[float, float]:
    d_knee = 2.0 * math.log(cfg.step_max / cfg.step_top)
    return d_knee, (2.0 / cfg.step_top) * (1.0 - math.exp(-d_knee / 2.0))


def _to_code(d: np.ndarray, cfg: CodecConfig) -> np.ndarray:
    d_knee, u_knee = _grid_knee(cfg)
    d = np.minimum(d, _D_CAP)
    u = (2.0 / cfg.step_top) * (1.0 - np.exp(-np.minimum(d, d_knee) / 2.0)) + np.maximum(d - d_knee, 0) / cfg.step_max
    return np.rint(u).astype(np.int64)


def _from_code(c: np.ndarray, cfg: CodecConfig) -> np.ndarray:
    d_knee, u_knee = _grid_knee(cfg)
    c = c.astype(np.float64)
    low = -2.0 * np.log(np.maximum(1.0 - np.minimum(c, u_knee) * cfg.step_top / 2.0, 1e-300))
    return np.where(c <= u_knee, low, d_knee + (c - u_knee) * cfg.step_max)


# ----------------------------------------------------------------------------------------------------------
# Exp-Golomb split: x >= 0 -> (symbol byte, raw low bits). Symbols carry the bit length and the top
# `h` mantissa bits, so zstd's Huffman stage models the distribution; the rest is near-uniform and stored raw.
def _floor_log2(v: np.ndarray) -> np.ndarray:
    """floor(log2(v)) of integers 1 <= v < 2^53 (exact: frexp reads the float exponent)."""
    return np.frexp(v.astype(np.float64))[1].astype(np.int64) - 1


def _eg_split(x: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = x.astype(np.uint64) + np.uint64(1)
    nbits = _floor_log2(v)
    width = np.maximum(nbits - h, 0)
    top = (v >> width.astype(np.uint64)).astype(np.int64)
    sym = np.where(width == 0, top, (1 << (h + 1)) + (width - 1) * (1 << h) + top - (1 << h))
    raw = v & ((np.uint64(1) << width.astype(np.uint64)) - np.uint64(1))
    return sym.astype(np.uint8), width, raw


def _pack_bits(raw: np.ndarray, width: np.ndarray) -> bytes:
    """Concatenate fields raw[i] < 2^width[i] (width <= 56), MSB first, zero-padded to whole bytes."""
    width, raw = width.astype(np.int64, copy=False), raw.astype(np.uint64, copy=False)
    if width.size == 0:
        return b""
    # Each field lands in the 64-bit word of its first bit, MSB-first; fields are disjoint, so OR-reducing the
    # (sorted) fields of each word builds it, and a field crossing into the next word adds its low part there.
    # Empty fields hold 0 and add nothing wherever they land.
    end = np.cumsum(width)
    word = (end - width) >> 6
    e = end - (word << 6)  # the field ends e bits into its word (e > 64: it spills over)
    over = np.maximum(e - 64, 0)
    head = np.where(over > 0, raw >> over.astype(np.uint64), raw << np.maximum(64 - e, 0).astype(np.uint64))
    total = int(end[-1])
    if total == 0:
        return b""
    words = np.zeros((total >> 6) + 1, np.uint64)  # + 1: empty fields at the very end land there
    first = np.flatnonzero(np.diff(word, prepend=-1))
    words[word[first]] = np.bitwise_or.reduceat(head, first)
    spill = np.flatnonzero(over)
    words[word[spill] + 1] |= raw[spill] << (64 - over[spill]).astype(np.uint64)
    return words.byteswap().tobytes()[: (total + 7) >> 3]


def _bit_windows(buf: np.ndarray) -> np.ndarray:
    """[n_bytes, 8] view: row i holds bytes i..i+7 of buf (zero-padded), for ``_byte_words``."""
    return np.lib.stride_tricks.sliding_window_view(np.concatenate([buf, np.zeros(8, np.uint8)]), 8)


def _byte_words(buf: np.ndarray) -> np.ndarray:
    """[n_bytes + 1] uint64: the big-endian 8-byte word starting at each byte of buf (zero-padded)."""
    return np.ascontiguousarray(_bit_windows(buf)).view(">u8").ravel().astype(np.uint64)


def _read_fields(
    words: np.ndarray, width: np.ndarray, start: int, n_bits: int, offset: np.ndarray | None = None
) -> np.ndarray:
    """Unsigned integers from consecutive MSB-first bit fields (widths <= 56) starting at bit ``start`` of a
    buffer of n_bits bits, given as its ``_byte_words``; ``offset`` [n] moves each field (several streams in one
    buffer)."""
    end = np.cumsum(width)
    off = start + end - width
    if offset is not None:
        off += offset
    if (int((off + width).max()) if offset is not None else start + int(end[-1])) > n_bits:
        raise ValueError("top-k blob: raw bit stream is shorter than its symbols say (corrupt or truncated)")
    if int(width.max()) > 56:
        raise ValueError("top-k blob: a raw bit field is wider than 56 bits (corrupt)")
    w = width.astype(np.uint64)
    return (words[off >> 3] >> (np.uint64(64) - (off & 7).astype(np.uint64) - w)) & ((np.uint64(1) << w) - np.uint64(1))


def sorted_rows(ids: np.ndarray, logits: np.ndarray, lse: np.ndarray, cfg: CodecConfig) -> tuple:
    """Rows sorted by logit: ids [L, K], value codes [L, K] (non-decreasing), zig-zag mass codes [L]."""
    lg = logits.astype(np.float64)
    # A teacher's top-k (torch.topk(sorted=True)) comes sorted already: then the stable sort is the identity.
    if not (lg[:, 1:] <= lg[:, :-1]).all():
        order = np.argsort(-lg, axis=1, kind="stable")
        lg, ids = np.take_along_axis(lg, order, 1), np.take_along_axis(ids, order, 1)
    lp = lg - lse.astype(np.float64)[:, None]
    codes = _to_code(lp[:, :1] - lp, cfg)
    # Per-row logit of the top-k mass, so the decoder can put the row back on the absolute scale.
    mass = np.exp(lp).sum(1)
    lam = np.log(mass) - np.log(np.maximum(1.0 - mass, 1e-300))
    lam_code = np.rint(np.clip(lam, -_LAMBDA_CAP, _LAMBDA_CAP) / cfg.mass_step).astype(np.int64)
    return ids, codes, np.where(lam_code < 0, -2 * lam_code - 1, 2 * lam_code)  # zig-zag


# ----------------------------------------------------------------------------------------------------------
# Context split of the per-entry streams by rank position in the row, per layout (layout 2 codes fewer ids
# through the table, and each stream costs a Huffman table: fewer classes pay).
_RANK_CLASSES = {1: (1, 4, 16, 32), 2: (1, 4, 16)}


def freq_rank(count_class: np.ndarray) -> np.ndarray:
    """Table position -> local index, most frequent class first (ties by id), known to both sides."""
    order = np.argsort(-count_class, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank


def rank_slices(start: int, k: int, version: int) -> list[tuple[str, slice]]:
    """The rank-position classes [start, k) of a layout, each as (stream-name suffix, column slice)."""
    edges = [start, *[e for e in _RANK_CLASSES[version] if start < e < k], k]
    return [(f"@{a}", slice(a, b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def by_rank(
    arr: np.ndarray, mask: np.ndarray | None, k: int, version: int, name: str, start: int = 0, offset: int = 0
) -> dict[str, np.ndarray]:
    """Entries of arr [K, L] (rank-major: row = rank) where mask (None: all), split into the rank-position classes from
    ``start`` on, each read rank-major; ``offset``: arr and mask start at that rank (row 0 = rank offset).

    Separate streams per class are a cheap context model: the top entries' statistics differ from the tail's.

    Returns:
        stream name (``name`` + class suffix) -> [n] entries.
    """
    slices = rank_slices(start, k, version)
    if not slices:
        return {}
    arr = arr[start - offset :]
    if mask is None:  # every entry
        per_rank = np.arange(arr.shape[0] + 1) * arr.shape[1]
        picked = arr.reshape(-1)
    else:
        mask = mask[start - offset :]
        per_rank = np.concatenate([[0], np.cumsum(mask.sum(1))])
        picked = arr[mask]
    ends = [int(per_rank[sl.stop - start]) for _, sl in slices]
    parts = np.split(picked, ends[:-1])
    return {name + suffix: part for (suffix, _), part in zip(slices, parts, strict=True)}
