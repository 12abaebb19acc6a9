"""Top-k teacher codec: packs one sequence's top-k ids and logits into one compact, checked blob.

The byte layouts are specified in docs/CODEC.md (codec "ddk-topk", layouts 1 and 2; encode writes 2, decode
reads both, dispatching on the blob header). In short, per sequence (L positions, k entries each):

- values: each row is sorted by logit; log-probabilities relative to the row's top entry, d = lp_0 - lp_i >= 0,
  are quantised on a companded grid whose step grows like exp(d / 2) (each entry then adds about the same KL
  whatever its probability: uniform steps in sqrt(p)) and is capped at ``step_max`` (so low-probability
  logits stay usable at T = 2). Rows store the code increments; a per-row code for the logit of the
  top-k mass restores the absolute level against the full-row logsumexp (tail mode stays exact to ~1/32).
- ids (layout 1): a per-sequence table (distinct ids, sorted, gap-coded, plus the bit length of each id's
  occurrence count) maps ids to local indices ordered by frequency class. Entries with equal value codes form a
  tie group whose order is free, so the group is stored sorted by index and coded as a first index plus gaps
  (this is where part of the ordering information, log2(k!) bits per row, is saved).
- ids (layout 2): the same, over a larger index space conditioned on the text (the row's input ids, which the
  dump stores beside the blob): index 0 is the next input token, then pointers into up to five earlier rows that
  share the row's context (codec_context.py), then the table, which now holds only the ids found nowhere else.
- integers are Exp-Golomb split into an entropy-coded symbol byte (zstd, Huffman) and raw low bits.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import zstandard

from ddk_offline.format.codec_bits import (
    _floor_log2,
    _from_code,
    by_rank,
    freq_rank,
    rank_slices,
    sorted_rows,
)
from ddk_offline.format.codec_config import CodecConfig
from ddk_offline.format.codec_context import (
    MAX_REFS,
    find_in_rows,
    live_references,
    reference_rows,
    resolve_references,
    stored_order,
    unique_ids,
)
from ddk_offline.format.codec_streams import fill_gaps, pack_streams, read_int_streams

CODEC_NAME = "ddk-topk"
LAYOUT_VERSION = 2  # what encode writes by default; decode reads every version in LAYOUTS
LAYOUTS = (1, 2)
_MAGIC = b"DKTK"
_HEADER = struct.Struct("<4sBBIHI")  # magic, layout version, n_streams, L, k, table size
_GAP_RICE_BITS = 6  # in-group gaps after a member with index >= 2^(6 + s) send their s low bits raw
_FIRST_BIT = np.array([(m & -m).bit_length() - 1 if m else 0 for m in range(1 << MAX_REFS)], np.int64)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class TopKCodec:
    """Encode/decode one sequence's teacher top-k (ids + logits) to one self-delimiting blob.

    Args:
        config: quantisation and entropy-coding knobs (defaults: ``CodecConfig()``).
        vocab_size: teacher vocabulary size V (ids must satisfy 0 <= id < V; V <= 2^32).
        k: entries per position K.
        layout: byte layout that ``encode`` writes (2, the default, needs the row's ``input_ids``; 1 does not).
            ``decode`` reads every layout in ``LAYOUTS`` whatever this says.

    An instance reuses its zstd contexts and is not thread-safe: give each writer/reader thread its own.
    """

    def __init__(
        self, config: CodecConfig | None = None, *, vocab_size: int, k: int, layout: int = LAYOUT_VERSION
    ) -> None:
        if not 1 <= vocab_size <= 2**32:
            raise ValueError(f"TopKCodec: vocab_size must be in [1, 2^32], got {vocab_size}")
        if not 1 <= k <= min(vocab_size, 65535):
            raise ValueError(f"TopKCodec: k must be in [1, min(vocab_size, 65535)], got {k}")
        if layout not in LAYOUTS:
            raise ValueError(f"TopKCodec: layout must be one of {LAYOUTS}, got {layout}")
        self.config = config or CodecConfig()
        self.vocab_size, self.k, self.layout = int(vocab_size), int(k), int(layout)
        self._cctx = zstandard.ZstdCompressor(level=self.config.zstd_level)
        self._cctx_small = zstandard.ZstdCompressor(level=self.config.zstd_level_small)
        self._dctx = zstandard.ZstdDecompressor()

    # -------------------------------------------------------------------------------------------- manifest
    def describe(self) -> dict:
        """What the dump manifest records to rebuild this codec (name, layout version, config)."""
        return {"name": CODEC_NAME, "version": self.layout, "config": self.config.to_dict()}

    @classmethod
    def from_description(cls, d: dict, *, vocab_size: int, k: int) -> TopKCodec:
        if d.get("name") != CODEC_NAME or d.get("version") not in LAYOUTS:
            raise ValueError(
                f"manifest codec {d.get('name')!r} v{d.get('version')} is not {CODEC_NAME!r} v{LAYOUTS}: "
                "read this dump with the ddk-offline version that wrote it"
            )
        return cls(CodecConfig.from_dict(d["config"]), vocab_size=vocab_size, k=k, layout=d["version"])

    # -------------------------------------------------------------------------------------------- encode
    def encode(
        self, ids: np.ndarray, logits: np.ndarray, lse: np.ndarray, input_ids: np.ndarray | None = None
    ) -> bytes:
        """Pack one sequence.

        Args:
            ids: [L, K] integer ids, any order, distinct within a row, 0 <= id < vocab_size.
            logits: [L, K] raw teacher logits (float), aligned with ``ids``.
            lse: [L] logsumexp of each full logit row (float32).
            input_ids: [L] the sequence's input token ids (required by layout 2, ignored by layout 1).

        Returns:
            One blob (bytes) that ``decode`` turns back into ids and logits in descending-logit order.
        """
        ints = self._integers(*self._check_inputs(ids, logits, lse, input_ids))
        L, K, n_table = ints.pop("shape")
        streams = [s for pair in self._streams(ints).values() for s in pair]
        head = _HEADER.pack(_MAGIC, self.layout, len(streams), L, K, n_table)
        body = head + struct.pack(f"<{len(streams)}I", *map(len, streams)) + b"".join(streams)
        return body + struct.pack("<I", zlib.crc32(body))

    def stream_sizes(
        self, ids: np.ndarray, logits: np.ndarray, lse: np.ndarray, input_ids: np.ndarray | None = None
    ) -> dict[str, int]:
        """Bytes per stream (symbols + raw bits) of ``encode``'s blob, for benchmarks; headers excluded."""
        ints = self._integers(*self._check_inputs(ids, logits, lse, input_ids))
        ints.pop("shape")
        return {name: len(a) + len(b) for name, (a, b) in self._streams(ints).items()}

    def _streams(self, ints: dict[str, np.ndarray]) -> dict[str, tuple[bytes, bytes]]:
        big = ("first", "gap")  # the large id-index streams: pure entropy coding, a fast level
        return pack_streams(
            ints, self.config.eg_precision, lambda name: self._cctx if name.startswith(big) else self._cctx_small
        )

    def _integers(self, ids: np.ndarray, logits: np.ndarray, lse: np.ndarray, input_ids: np.ndarray | None) -> dict:
        """The integer arrays the blob entropy-codes, in stream order (plus "shape": L, K, table size)."""
        (L, K), v = ids.shape, self.layout
        ids, codes, mass = sorted_rows(ids, logits, lse, self.config)
        if v == 1:
            table, inv, counts = unique_ids(ids, self.vocab_size)
            # Only the bit length of each count is stored: ordering by it costs < 0.002 B/entry more than exact.
            count_class = np.floor(np.log2(counts)).astype(np.int64)
            local = freq_rank(count_class)[inv.reshape(L, K)]
        else:
            # Layout 2: the next input token takes index 0; an id found in a reference row becomes a pointer
            # (first 1 + c * K + its stored position in reference c, then renumbered over the live entries);
            # the rest index the table of such misses, from n_ref = 1 + (reference rows) * K on.
            nxt = np.full(L, -1, np.int64)
            nxt[:-1] = input_ids[1:]
            is_next = ids == nxt[:, None]
            refs = reference_rows(input_ids)
            n_ref = 1 + (refs >= 0).sum(1, keepdims=True) * K
            found, col_1 = find_in_rows(ids, refs, self.vocab_size)
            # The first reference that holds the id (where any does): the lowest set bit of a 5-bit mask.
            holders = np.zeros((L, K), np.uint8)
            for c in range(MAX_REFS):
                holders |= found[c].view(np.uint8) << c
            holders[is_next] = 0
            hit = holders > 0
            slot = _FIRST_BIT[holders]
            ref_row = refs[np.arange(L)[:, None], slot]
            ref_col = col_1.reshape(-1)[(slot * L + np.arange(L)[:, None]) * K + np.arange(K)].astype(np.int64) - 1
            local = np.where(hit, 1 + slot * K, 0)
            miss = ~hit & ~is_next
            table, inv, counts = unique_ids(ids[miss], self.vocab_size)
            count_class = np.floor(np.log2(counts)).astype(np.int64)
            local[miss] = np.broadcast_to(n_ref, (L, K))[miss] + freq_rank(count_class)[inv]
            perm, local = stored_order(codes, local, hit, ref_row, ref_col)
            at = perm + np.arange(0, L * K, K)[:, None]
            codes = codes.reshape(-1)[at]
            # Pointers count only the live reference entries (first listing of an id, not the next token).
            stored_ids = ids.reshape(-1)[at]
            stored_ids = np.vstack([stored_ids, np.full((1, K), -1)])  # row L: "no reference row"
            ref_ids = stored_ids[np.where(refs >= 0, refs, L)].reshape(L, -1)
            live_rank = np.cumsum(live_references(ref_ids, nxt), axis=1) - 1
            at = np.nonzero((local >= 1) & (local < n_ref))
            local[at] = 1 + live_rank[at[0], local[at] - 1]
        # Inside a tie group (equal value codes) the order is free: sort by local index to save its entropy.
        # (Layout 2's stored order already is that order: renumbering pointers over live entries is monotone.)
        if v == 1:
            tie = np.lexsort((local, codes), axis=1)
            codes, local = np.take_along_axis(codes, tie, 1), np.take_along_axis(local, tie, 1)
        # The streams list entries rank-major (docs/CODEC.md): work on [K, L] copies, whose rows are ranks.
        c, loc = codes.T.copy(), local.T.copy()
        starts = np.ones((K, L), bool)
        np.greater(c[1:], c[:-1], out=starts[1:])
        gaps = loc.copy()
        gaps[1:] -= loc[:-1] + 1
        ints: dict = {"table": np.diff(table, prepend=-1) - 1, "count_class": count_class, "mass": mass}
        # Value codes: which entries open a new code (bitmap) and by how much the code rises there.
        ints.update(by_rank(starts, None, K, v, "starts", start=1))
        ints.update(by_rank(c[1:] - c[:-1] - 1, starts[1:], K, v, "rise", start=1, offset=1))
        ints.update(by_rank(loc, starts, K, v, "first"))
        # In-group gaps scale with the previous member's index (Zipf-like table order): their low
        # `shift` bits are near-uniform, so they go raw (rank-major) and only the quotient is entropy-coded.
        shift = np.zeros((K, L), np.int64)
        shift[1:] = np.maximum(_floor_log2(loc[:-1] + 1) - _GAP_RICE_BITS, 0)
        shift[starts] = 0
        cont = ~starts
        if v == 1:
            ints.update(by_rank(gaps >> shift, cont, K, v, "gap"))
        else:  # gaps among pointers (small) and among table indices (large) get separate streams
            in_ref = np.zeros((K, L), bool)
            np.less(loc[:-1], n_ref.T, out=in_ref[1:])
            quotient = gaps >> shift
            ints.update(by_rank(quotient, cont & in_ref, K, v, "gap_ref"))
            ints.update(by_rank(quotient, cont & ~in_ref, K, v, "gap_table"))
        width = shift[cont]
        ints["gap_low"] = ((gaps[cont] & ((1 << width) - 1)).astype(np.uint64), width)
        ints["shape"] = (L, K, table.size)
        return ints

    # -------------------------------------------------------------------------------------------- decode
    def decode(
        self, blob: bytes, lse: np.ndarray, input_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unpack one sequence.

        Args:
            blob: bytes from ``encode`` (any layout in ``LAYOUTS``; the blob's header says which).
            lse: [L] float32 logsumexp of each full logit row (as stored beside the blob).
            input_ids: [L] the sequence's input token ids (required for layout-2 blobs).

        Returns:
            ids [L, K] int64 and logits [L, K] float32 (raw logit scale, logits = lse + log p), each row in
            descending-logit order (ties: by the codec's local index).
        """
        view = memoryview(blob)
        if len(view) < _HEADER.size + 4 or zlib.crc32(view[:-4]) != struct.unpack("<I", view[-4:])[0]:
            raise ValueError(f"top-k blob of {len(view)} bytes fails its CRC32 check (corrupt or truncated)")
        magic, version, n_streams, L, K, n_table = _HEADER.unpack_from(view)
        if magic != _MAGIC or version not in LAYOUTS:
            raise ValueError(f"top-k blob: magic {magic!r} v{version}, expected {_MAGIC!r} v{LAYOUTS}")
        if K != self.k:
            raise ValueError(f"top-k blob holds k={K} but the codec was built with k={self.k} (manifest mismatch)")
        lse = np.asarray(lse, np.float64).reshape(-1)
        if lse.shape != (L,):
            raise ValueError(f"decode: lse has {lse.size} values, the blob holds L={L} positions")
        if version >= 2:
            if input_ids is None:
                raise ValueError("decode: a layout-2 top-k blob needs the row's input_ids (pass input_ids=...)")
            input_ids = np.asarray(input_ids).reshape(-1)
            if input_ids.shape != (L,) or not np.issubdtype(input_ids.dtype, np.integer):
                raise ValueError(f"decode: input_ids must be [L={L}] integers, got {input_ids.dtype} {input_ids.shape}")
            input_ids = input_ids.astype(np.int64)
        try:
            return self._decode_streams(view, version, n_streams, L, K, n_table, lse, input_ids)
        except (zstandard.ZstdError, StopIteration, struct.error, IndexError) as e:
            raise ValueError(f"top-k blob: malformed streams ({type(e).__name__}: {e})") from e

    def _decode_streams(self, view, version, n_streams, L, K, n_table, lse, input_ids):
        cfg, h = self.config, self.config.eg_precision
        lens = struct.unpack_from(f"<{n_streams}I", view, _HEADER.size)
        pos, chunks = _HEADER.size + 4 * n_streams, []
        for n in lens:
            chunks.append(view[pos : pos + n])
            pos += n
        if pos != len(view) - 4:
            raise ValueError("top-k blob: stream lengths do not add up to the blob size (corrupt)")
        it = iter(chunks)
        table, count_class, zz = read_int_streams(it, [(n_table, True), (n_table, True), (L, True)], h, self._dctx)
        table = np.cumsum(table + 1) - 1
        lam = np.where(zz % 2 == 1, -(zz + 1) // 2, zz // 2) * cfg.mass_step

        def bits(n: int) -> np.ndarray:
            packed = np.frombuffer(self._dctx.decompress(next(it), max_output_size=(n + 7) // 8), np.uint8)
            if packed.size != (n + 7) // 8 or len(next(it)):
                raise ValueError("top-k blob: a tie bitmap has the wrong size (corrupt)")
            return np.unpackbits(packed)[:n].astype(bool)

        # Rank-major [K, L] arrays (row = rank), as the streams list their entries.
        starts = np.ones((K, L), bool)
        for _, sl in rank_slices(1, K, version):
            starts[sl] = bits((sl.stop - sl.start) * L).reshape(-1, L)
        # Every other integer stream's length is known now: join them in one pass, then hand them out in order.
        per_rank = np.concatenate([[0], np.cumsum(starts.sum(1))]).tolist()
        slices = rank_slices(0, K, version)
        n_starts = [per_rank[sl.stop] - per_rank[sl.start] for _, sl in slices]
        n_cont = [(sl.stop - sl.start) * L - n for n, (_, sl) in zip(n_starts, slices, strict=True)]
        rise_slices = rank_slices(1, K, version)
        counts = [(per_rank[sl.stop] - per_rank[sl.start], True) for _, sl in rise_slices]
        counts += [(n, True) for n in n_starts]
        counts += [(n, True) for n in n_cont] if version == 1 else [(n, False) for n in n_cont + n_cont]
        streams = read_int_streams(it, counts, h, self._dctx)
        n_rise = len(rise_slices)
        codes = np.zeros((K, L), np.int64)  # the code steps (rise + 1 at a group start, else 0), summed in place
        codes[0] = 1
        codes[1:][starts[1:]] = _joined(streams[:n_rise]) + 1
        np.cumsum(codes, axis=0, out=codes)
        codes -= 1
        local = np.zeros((K, L), np.int64)
        local[starts] = _joined(streams[n_rise : n_rise + len(n_starts)])
        gaps = streams[n_rise + len(n_starts) :]
        if version == 2:
            refs = reference_rows(input_ids)
            n_ref = 1 + (refs >= 0).sum(1) * K  # per row: where the table indices start
        if len(next(it)):
            raise ValueError("top-k blob: the raw gap stream has a symbol part (corrupt)")
        low = np.frombuffer(next(it), np.uint8)
        fill_gaps(local, starts, gaps, low, slices, _GAP_RICE_BITS, n_ref if version == 2 else None)
        local, codes = np.ascontiguousarray(local.T), np.ascontiguousarray(codes.T)
        if version == 1:
            if n_table == 0 or local.max() >= n_table or table[-1] >= self.vocab_size:
                raise ValueError("top-k blob: ids fall outside the id table or the vocabulary (corrupt)")
            ids = table[np.argsort(-count_class, kind="stable")][local]
        else:
            ids = self._resolve(local, table, count_class, input_ids, refs, n_ref[:, None])

        d = _from_code(codes, cfg)
        mass = 1.0 / (1.0 + np.exp(-lam))
        lp0 = np.log(mass) - np.log(np.exp(-d).sum(1))
        logits = (lse + lp0)[:, None] - d
        return ids, logits.astype(np.float32)

    def _resolve(self, local, table, count_class, input_ids, refs, n_ref) -> np.ndarray:
        """Layout 2: local indices [L, K] -> ids (next-token slot, pointers into reference rows, table)."""
        L, K = local.shape
        rows = np.broadcast_to(np.arange(L)[:, None], (L, K))
        is_table, is_next = local >= n_ref, local == 0
        pointer = ~is_table & ~is_next
        t_idx = (local - n_ref)[is_table]
        if t_idx.size and (t_idx.max() >= table.size or table[-1] >= self.vocab_size):
            raise ValueError("top-k blob: ids fall outside the id table or the vocabulary (corrupt)")
        nxt = rows[is_next] + 1
        if nxt.size and (nxt.max() >= L or input_ids[nxt].max() >= self.vocab_size or input_ids[nxt].min() < 0):
            raise ValueError("top-k blob: a next-token slot has no valid next input token (corrupt or wrong input_ids)")
        base = np.zeros((L, K), np.int64)
        base[is_table] = table[np.argsort(-count_class, kind="stable")][t_idx]
        base[is_next] = input_ids[nxt]
        next_token = np.append(input_ids[1:], -1)
        index = np.where(pointer, local - 1, -1)
        return resolve_references(base, index, refs, next_token, self.vocab_size)

    def _check_inputs(self, ids, logits, lse, input_ids) -> tuple:
        ids, logits, lse = np.asarray(ids), np.asarray(logits), np.asarray(lse)
        if self.layout >= 2:
            if input_ids is None:
                raise ValueError("encode: layout 2 needs the sequence's input_ids (pass input_ids=...)")
            input_ids = np.asarray(input_ids)
            if input_ids.shape != ids.shape[:1] or not np.issubdtype(input_ids.dtype, np.integer):
                raise ValueError(f"encode: input_ids must be [L={ids.shape[0]}] integers, got {input_ids.shape}")
            input_ids = input_ids.astype(np.int64)
        if ids.ndim != 2 or ids.shape[1] != self.k or logits.shape != ids.shape or lse.shape != ids.shape[:1]:
            raise ValueError(
                f"encode: expected ids/logits [L, {self.k}] and lse [L], got {ids.shape}, {logits.shape}, {lse.shape}"
            )
        if ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"encode: ids must be a non-empty integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"encode: ids must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        if (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
            raise ValueError("encode: a row of topk_ids repeats an id; pass the teacher's distinct top-k ids")
        if np.isnan(logits).any() or np.isposinf(logits).any() or not np.isfinite(lse).all():
            raise ValueError("encode: logits contain NaN/+inf or lse is not finite; check the teacher's outputs")
        return ids, logits, lse, input_ids
