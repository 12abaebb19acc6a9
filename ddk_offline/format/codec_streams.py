"""Stream framing of the top-k codec (docs/CODEC.md, "Byte layout"): integer arrays to (zstd symbol frame, raw
bits) pairs and back, many streams per numpy call.

A blob holds about 20 streams, most of them short; splitting, packing and joining each stream on its own cost
more in numpy call overhead than in work, so encode splits every integer stream in one ``_eg_split`` and packs
every raw part in one ``_pack_bits`` (each stream padded to whole bytes, as its own packing would), and decode
joins a batch of streams in one ``_read_fields``. The bytes are those of stream-by-stream coding.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import zstandard

from ddk_offline.format.codec_bits import _byte_words, _eg_split, _pack_bits, _read_fields


def pack_streams(ints: dict, h: int, cctx_for) -> dict[str, tuple[bytes, bytes]]:
    """Frame each named array: int64 -> Exp-Golomb (symbols, raw bits), bool -> packed bitmap, (values, widths)
    -> raw bits only.

    Args:
        ints: stream name -> [n] int64 (>= 0), [n] bool, or a (values uint64 [n], widths [n]) tuple, in blob order.
        h: Exp-Golomb mantissa bits (``CodecConfig.eg_precision``).
        cctx_for: stream name -> the ``zstandard.ZstdCompressor`` for its symbols.

    Returns:
        name -> (zstd frame of the symbol bytes or b"", raw bytes or b"").
    """
    names = [n for n, a in ints.items() if not isinstance(a, tuple) and a.dtype != bool]
    arrays = [ints[n].ravel() for n in names]
    sym, width, raw = _eg_split(np.concatenate(arrays) if arrays else np.zeros(0, np.int64), h)
    sizes = [a.size for a in arrays]
    raws, widths = np.split(raw, np.cumsum(sizes)[:-1]), np.split(width, np.cumsum(sizes)[:-1])
    syms = np.split(sym, np.cumsum(sizes)[:-1])
    raw_parts = dict(zip(names, zip(raws, widths, strict=True), strict=True))
    for n, a in ints.items():
        if isinstance(a, tuple):
            raw_parts[n] = (a[0].astype(np.uint64), np.asarray(a[1], np.int64))
    # One packing for every raw part: a zero field after each stream pads it to a whole byte.
    order = [n for n in ints if n in raw_parts]
    n_bits = [int(raw_parts[n][1].sum()) for n in order]
    pad = [-b % 8 for b in n_bits]
    packed = _pack_bits(
        np.concatenate([x for n in order for x in (raw_parts[n][0], np.zeros(1, np.uint64))]),
        np.concatenate([x for n, p in zip(order, pad, strict=True) for x in (raw_parts[n][1], np.array([p]))]),
    )
    ends = np.cumsum([(b + p) // 8 for b, p in zip(n_bits, pad, strict=True)]).tolist()
    raw_bytes = {n: packed[e - (b + p) // 8 : e] for n, b, p, e in zip(order, n_bits, pad, ends, strict=True)}
    sym_of = dict(zip(names, syms, strict=True))
    out = {}
    for n, a in ints.items():
        if isinstance(a, tuple):
            out[n] = (b"", raw_bytes[n])
        elif a.dtype == bool:  # a bitmap: packed bytes, zstd's Huffman stage models 8 decisions per symbol
            out[n] = (cctx_for(n).compress(np.packbits(a.ravel()).tobytes()), b"")
        else:
            out[n] = (cctx_for(n).compress(sym_of[n].tobytes()), raw_bytes[n])
    return out


def _eg_tables(h: int) -> tuple[np.ndarray, np.ndarray]:
    """Exp-Golomb symbol byte -> (raw bit count, leading bits of x + 1), for ``eg_precision`` h."""
    s = np.arange(256, dtype=np.int64)
    direct = s < (1 << (h + 1))
    width = np.where(direct, 0, ((s - (1 << (h + 1))) >> h) + 1)
    top = np.where(direct, s, ((s - (1 << (h + 1))) & ((1 << h) - 1)) + (1 << h))
    return width, top.astype(np.uint64)


_EG_WIDTH, _EG_TOP = (list(t) for t in zip(*(_eg_tables(h) for h in range(4)), strict=True))


def read_int_streams(
    chunks: Iterator, counts: list[tuple[int, bool]], h: int, dctx: zstandard.ZstdDecompressor
) -> list[np.ndarray]:
    """The next ``len(counts)`` integer streams of a blob, joined in one pass.

    Args:
        chunks: iterator over the blob's stream parts (symbols, raw, symbols, raw, ...), positioned at a stream.
        counts: per stream (n, exact): it holds n symbols (exact) or at most n.
        h: Exp-Golomb mantissa bits.
        dctx: the zstd decompressor.

    Returns:
        One int64 array per stream.

    Raises:
        ValueError: a stream holds the wrong number of symbols or too few raw bits (corrupt blob).
    """
    syms, raws = [], []
    for n, exact in counts:
        sym = np.frombuffer(dctx.decompress(next(chunks), max_output_size=n), np.uint8)
        if sym.size > n or (exact and sym.size != n):
            raise ValueError(f"top-k blob: stream holds {sym.size} symbols, expected {n} (corrupt)")
        syms.append(sym)
        raws.append(next(chunks))
    s = np.concatenate(syms) if syms else np.zeros(0, np.uint8)
    width, top = _EG_WIDTH[h][s], _EG_TOP[h][s]
    sizes = [a.size for a in syms]
    value = top.astype(np.uint64)
    if width.any():
        # Each stream's raw part starts at a byte of the concatenated raw parts: field offsets restart there.
        raw_len = [len(r) for r in raws]
        start_field = np.cumsum([0, *sizes[:-1]])
        end = np.cumsum(width)
        before = np.concatenate([[0], end])[start_field]  # raw bits of earlier streams' fields
        base = np.cumsum([0, *raw_len[:-1]]) * 8 - before
        used = np.concatenate([[0], end])[np.cumsum(sizes)] - before
        if (used > np.asarray(raw_len) * 8).any():
            raise ValueError("top-k blob: raw bit stream is shorter than its symbols say (corrupt or truncated)")
        words = _byte_words(np.frombuffer(b"".join(raws), np.uint8))
        shift = np.repeat(base, sizes)
        low = _read_fields(words, width, 0, 8 * (words.size - 1), offset=shift)
        value = (value << width.astype(np.uint64)) | low
    return np.split((value - np.uint64(1)).astype(np.int64), np.cumsum(sizes)[:-1])


def fill_gaps(
    local: np.ndarray,
    starts: np.ndarray,
    gaps: list[np.ndarray],
    low: np.ndarray,
    slices: list,
    rice_bits: int,
    n_ref: np.ndarray | None,
) -> None:
    """Decode the in-group members' local indices, rank by rank (a member's raw-bit width, and in layout 2 the
    stream of its gap, depend on the previous member's index: vectorised over positions, sequential over ranks).

    Args:
        local: [K, L] int64 rank-major local indices, filled at group starts; the other entries are filled here.
        starts: [K, L] bool, the group starts.
        gaps: the gap quotient streams: layout 1 one per rank class (``slices``), layout 2 the ``gap_ref``
            streams then the ``gap_table`` streams.
        low: the raw gap bits (``gap_low``), uint8.
        slices: ``rank_slices(0, K, layout)``.
        rice_bits: ``_GAP_RICE_BITS`` of the codec.
        n_ref: layout 2: [L] first table index of each row (gaps after a smaller index are in ``gap_ref``);
            layout 1: None.

    Raises:
        ValueError: streams of the wrong length or raw bits too few or too wide (corrupt blob).
    """
    K, L = local.shape
    cont_at = ~starts
    if n_ref is None:
        gap = np.zeros((K, L), np.int64)
        gap[cont_at] = np.concatenate(gaps) if gaps else np.zeros(0, np.int64)
    else:
        split = [gaps[: len(slices)], gaps[len(slices) :]]
        used = np.zeros((2, len(slices)), np.int64)
    rank_class = np.zeros(K, np.int64)  # rank -> its rank class (index into the layout-2 gap streams)
    for c, (_, sl) in enumerate(slices):
        rank_class[sl] = c
    rank_class = rank_class.tolist()
    words, pos = _byte_words(low), 0
    n_low_bits = 8 * (words.size - 1)
    for j in range(1, K):
        cont = np.flatnonzero(cont_at[j])
        if cont.size == 0:
            continue
        prev = local[j - 1][cont]
        if n_ref is None:
            g = gap[j][cont]
        else:
            c = rank_class[j]
            in_ref = prev < n_ref[cont]
            n_in = int(np.count_nonzero(in_ref))
            a, b = used[0, c], used[1, c]
            g = np.empty(cont.size, np.int64)
            g[in_ref] = split[0][c][a : a + n_in]  # raises on a short stream (corrupt)
            g[~in_ref] = split[1][c][b : b + cont.size - n_in]
            used[0, c], used[1, c] = a + n_in, b + cont.size - n_in
        # Rice split: s = max(floor(log2(prev + 1)) - rice_bits, 0) low bits of each gap were sent raw.
        shift = np.maximum(np.frexp((prev + 1).astype(np.float64))[1] - (rice_bits + 1), 0)
        end = np.cumsum(shift)
        n_bits = int(end[-1])
        if n_bits:  # this rank's low bits: consecutive MSB-first fields from bit pos on
            if pos + n_bits > n_low_bits or int(shift.max()) > 56:
                raise ValueError("top-k blob: the raw gap bits are fewer or wider than the indices say (corrupt)")
            off = end + (pos - shift)
            w = shift.astype(np.uint64)
            bits = (words[off >> 3] >> (np.uint64(64) - (off & 7).astype(np.uint64) - w)) & (
                (np.uint64(1) << w) - np.uint64(1)
            )
            g = (g << shift) | bits.astype(np.int64)
            pos += n_bits
        local[j][cont] = prev + g + 1
    if n_ref is not None and any(int(u) != s.size for u, s in zip(used.ravel(), split[0] + split[1], strict=True)):
        raise ValueError("top-k blob: gap streams hold more values than the tie bitmaps use (corrupt)")
