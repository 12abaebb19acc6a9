"""Text context for layout 2 of the top-k codec: which earlier rows of a sequence predict a row's top-k ids.

A row's top-k set is mostly determined by the text. Both sides of the codec know the row's ``input_ids`` (stored
in the same Parquet row) and every earlier row, so layout 2 gives each row n a short list of *reference rows*
and codes a top-k id that also occurs in a reference row as a pointer to it (docs/CODEC.md, "Ids (layout 2)"):

1. the last earlier row whose two input tokens ending at it match those ending at n (bigram context), unless it
   is also the same-token row below;
2. the last earlier row m with the same input token as n (``input_ids[m] == input_ids[n]``);
3. the previous row n - 1;
4. - 5. m's own last same-token row, and that row's (the same-token chain, up to 3 deep).

Duplicates are dropped and the list is compacted, so row n has up to ``MAX_REFS`` references. Besides them,
the true next token ``input_ids[n + 1]`` is nearly always in row n's top-k (92% on real text, 55% at rank 0)
and gets index 0.
"""

from __future__ import annotations

import numpy as np

MAX_REFS = 5


def _prev_occurrence(order: np.ndarray, same_as_prev: np.ndarray, n: int) -> np.ndarray:
    """prev[i] = the last j < i with the same key, or -1; ``order`` sorts the keys stably, ``same_as_prev``
    says whether sorted item t + 1 has the key of sorted item t."""
    prev = np.full(n, -1, np.int64)
    prev[order[1:][same_as_prev]] = order[:-1][same_as_prev]
    return prev


def reference_rows(input_ids: np.ndarray) -> np.ndarray:
    """Reference rows of each position (see the module docstring).

    Args:
        input_ids: [L] integer token ids of the sequence.

    Returns:
        refs [L, MAX_REFS] int64: earlier row indices, most predictive first; -1 (always at the end) where a
        row has fewer references.
    """
    tok = np.asarray(input_ids, np.int64)
    L = tok.size
    order = np.argsort(tok, kind="stable")
    same_tok = _prev_occurrence(order, tok[order][1:] == tok[order][:-1], L)
    chain = [same_tok]
    for _ in range(MAX_REFS - 3):  # the same-token row's own same-token row, and so on
        chain.append(np.where(chain[-1] >= 0, same_tok[np.maximum(chain[-1], 0)], -1))
    bigram = np.full(L, -1, np.int64)
    if L > 1:
        a, b = tok[:-1], tok[1:]  # the bigram ending at row n = 1..L-1
        o = np.lexsort((b, a))
        eq = (a[o][1:] == a[o][:-1]) & (b[o][1:] == b[o][:-1])
        prev = _prev_occurrence(o, eq, L - 1)
        bigram[1:] = np.where(prev >= 0, prev + 1, -1)
    bigram[bigram == same_tok] = -1
    # Order measured on real text (docs/CODEC.md): earlier references get the smaller pointer slots.
    cand = np.stack([bigram, same_tok, np.arange(L) - 1, *chain[1:]], axis=1)
    for c in range(1, MAX_REFS):  # a row listed twice gives no new ids: keep its first listing
        cand[:, c][(cand[:, :c] == cand[:, c : c + 1]).any(1)] = -1
    keep = np.argsort(cand < 0, axis=1, kind="stable")
    return np.take_along_axis(cand, keep, 1)


_DENSE_VOCAB = 2**22  # up to this vocabulary, id -> index maps are dense arrays (10x faster than sorting)


def unique_ids(values: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True, return_counts=True)`` for ids in [0, vocab_size), flat inverse."""
    values = values.ravel()
    if vocab_size > _DENSE_VOCAB:
        table, inv, counts = np.unique(values, return_inverse=True, return_counts=True)
        return table, inv.ravel(), counts
    counts = np.bincount(values, minlength=vocab_size)
    table = np.flatnonzero(counts)
    index = np.zeros(vocab_size, np.int64)
    index[table] = np.arange(table.size)
    return table, index[values], counts[table]


def find_in_rows(ids: np.ndarray, rows: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each entry's id sits in other rows of the same sequence.

    Args:
        ids: [L, K] int64 ids, each row distinct.
        rows: [L, C] int64 rows to search for each row's entries (-1: none).
        vocab_size: ids are < vocab_size.

    Returns:
        found [C, L, K] bool and col_1 [C, L, K] (an unsigned integer type): 1 + the column of the id in
        ``ids[rows[n, c]]`` where found, 0 elsewhere.
    """
    L, K = ids.shape
    _, u, counts = unique_ids(ids, vocab_size)
    # A dense [L + 1, ids seen in 2+ rows] map of column + 1 (0: absent) makes each lookup one gather; ids seen
    # in one row only can never be found elsewhere and all share the last, empty column, as "no row" (-1) shares
    # the last, empty row. Zero-filled, so the map's pages are only touched where written.
    multi = counts > 1
    n_multi = int(multi.sum())
    u = np.where(multi[u], np.cumsum(multi)[u] - 1, n_multi).reshape(L, K)
    where = np.zeros((L + 1, n_multi + 1), np.uint8 if K < 2**8 else np.uint16 if K < 2**16 else np.uint32)
    where[np.arange(L)[:, None], u] = np.arange(1, K + 1)
    where[:, n_multi] = 0
    row = np.where(rows.T >= 0, rows.T, L) * (n_multi + 1)
    col_1 = where.reshape(-1)[row[:, :, None] + u[None]]
    return col_1 > 0, col_1


def stored_order(codes: np.ndarray, local: np.ndarray, hit: np.ndarray, ref_row: np.ndarray, ref_col: np.ndarray):
    """Order of each row as stored (code ascending, then local index ascending), with pointer slots resolved.

    A hit's local index is ``local + (position of the referenced entry in its row's *stored* order)``, so a row's
    stored order depends on earlier rows' stored orders. Rather than walking the rows in sequence, every row is
    sorted at once from a guess of those positions (their input columns), then only the rows whose hits name a
    row that moved are sorted again, until nothing moves. Each row's order is a function of earlier rows only,
    so the system has exactly one fixed point, the sequential answer; pass t settles at least every row whose
    chain of references is t deep, so it ends (on real text after 4-9 passes).

    Args:
        codes: [L, K] value codes, non-decreasing along each row.
        local: [L, K] local indices of misses and of the next-token slot; for hits, the slot base ``1 + c * K``.
        hit: [L, K] bool, entries coded as pointers into reference rows.
        ref_row, ref_col: [L, K] the referenced row and its column (in the input order of ``codes``), read at hits.

    Returns:
        perm [L, K] (stored column j holds input column perm[n, j]) and the stored local indices [L, K].
    """
    L, K = codes.shape
    key = codes * (int(local.max(initial=0)) + K + 1) + local  # stored order = ascending key (keys are distinct)
    flat = key.reshape(-1)
    hits = np.flatnonzero(hit)
    target = (ref_row * K + ref_col).reshape(-1)[hits]
    target_row, base = target // K, flat[hits]
    ranks = np.arange(K)
    inv = np.tile(ranks, L)  # inv[n * K + input column] = stored position; first guess: the input order
    flat[hits] = base + inv[target]
    perm = key.argsort(axis=1, kind="stable")  # keys are distinct (any sort agrees); rows are nearly sorted
    row_start = np.arange(0, L * K, K)[:, None]
    settled = inv.copy()
    inv[(perm + row_start).reshape(-1)] = settled
    moved = (inv != settled).reshape(L, K).any(1)
    while True:
        again = np.flatnonzero(moved[target_row])  # hits whose target row moved in the last pass
        if again.size == 0:
            break
        flat[hits[again]] = base[again] + inv[target[again]]
        mark = np.zeros(L, bool)
        mark[hits[again] // K] = True
        rows = np.flatnonzero(mark)
        p = key[rows].argsort(axis=1, kind="stable")
        changed = (p != perm[rows]).any(1)
        rows, p = rows[changed], p[changed]
        perm[rows] = p
        inv.reshape(L, K)[rows[:, None], p] = ranks
        moved = np.zeros(L, bool)
        moved[rows] = True
    out = local.reshape(-1).copy()
    out[hits] = out[hits] + inv[target]
    return perm, out[perm + row_start]


def live_references(ref_ids: np.ndarray, next_token: np.ndarray) -> np.ndarray:
    """Which reference entries a pointer can name: the first occurrence of each id in the row's reference list,
    unless it is the next token (which has index 0).

    Args:
        ref_ids: [L, W] ids of each row's reference rows, concatenated in listed order (stored order within a
            row); -1 where a row has fewer references.
        next_token: [L] ``input_ids[n + 1]`` (-1 at the last row).

    Returns:
        live [L, W] bool. Pointer index p of row n names the p-th live entry of ``ref_ids[n]``.
    """
    L, W = ref_ids.shape
    # One sort per row of (id, position) keys; int32 keys when they fit (twice as fast to sort).
    dt = np.int32 if (int(ref_ids.max(initial=0)) + 2) * W < 2**31 else np.int64
    key = (ref_ids + 1).astype(dt) * dt(W) + np.arange(W, dtype=dt)
    key.sort(axis=1)
    srt = key // dt(W)
    first = np.empty((L, W), bool)
    first[:, :1] = True
    np.not_equal(srt[:, 1:], srt[:, :-1], out=first[:, 1:])
    live = np.empty((L, W), bool)
    live.reshape(-1)[(key - srt * dt(W)) + np.arange(0, L * W, W)[:, None]] = first
    return live & (ref_ids >= 0) & (ref_ids != next_token[:, None])


def resolve_references(
    ids: np.ndarray, pointer: np.ndarray, refs: np.ndarray, next_token: np.ndarray, vocab_size: int
) -> np.ndarray:
    """Decode pointer entries row by row (a row's pointers name ids of earlier rows).

    Args:
        ids: [L, K] int64, every non-pointer entry decoded (in [0, vocab_size)); pointer entries ignored.
        pointer: [L, K] int64 pointer index of each pointer entry (live-entry number, see ``live_references``),
            -1 elsewhere.
        refs: [L, MAX_REFS] from ``reference_rows``.
        next_token: [L] as for ``live_references``.
        vocab_size: ids are < vocab_size.

    Returns:
        ids [L, K] with the pointer entries filled.

    Raises:
        ValueError: a pointer beyond the row's live reference entries (corrupt blob or other input ids).
    """
    L, K = ids.shape
    is_ptr = pointer >= 0
    # Work on compact ids (every id of the sequence is a table id or a next token) so the first-occurrence
    # map below is small whatever the vocabulary.
    values, compact, _ = unique_ids(ids[~is_ptr], vocab_size)
    cid = np.zeros((L, K), np.int64)
    cid[~is_ptr] = compact
    at = np.minimum(np.searchsorted(values, next_token), max(values.size - 1, 0))
    has = values[at] == next_token if values.size else np.zeros(L, bool)
    # Row n's list is its next token (or, without one, an id found nowhere: values.size) then its references'
    # entries: the next token's copies are then never first, so never live, and a pointer p names entry p + 1.
    out = np.concatenate([cid.reshape(-1), np.where(has, at, values.size)])
    flat = np.flatnonzero(is_ptr)
    bounds = np.searchsorted(flat, np.arange(L + 1) * K).tolist()
    # The loop below is numpy call overhead (~1,000 rows, each a handful of calls on ~300 entries), so each row's
    # list is read *backwards*, from a right-aligned row of rev_pos: the first-occurrence scatter then goes
    # through a contiguous index (a reversed view costs numpy 3x more), and the p-th live entry is the
    # (p + 2)-th from the end of the reversed live list (entry 0, the next token, is always live): index -2 - p.
    W = 1 + MAX_REFS * K
    rev_pos = np.empty((L, W), np.int64)
    rev_pos[:, :-1] = (np.maximum(refs[:, ::-1], 0)[:, :, None] * K + np.arange(K - 1, -1, -1)).reshape(L, -1)
    rev_pos[:, -1] = L * K + np.arange(L)
    start = (W - 1 - (refs >= 0).sum(1) * K).tolist()  # row n's list is rev_pos[n, start[n]:]
    back = np.arange(W - 1, -1, -1)  # back[start:] = list positions w - 1, ..., 0
    pick = -2 - pointer.reshape(-1)[flat]
    first_at = np.zeros(values.size + 1, np.int64)
    try:
        for n in np.flatnonzero(np.diff(bounds)).tolist():
            s, a, b = start[n], bounds[n], bounds[n + 1]
            rev_ids = out[rev_pos[n, s:]]
            first_at[rev_ids] = back[s:]  # written last to first: the earliest position of each id wins
            out[flat[a:b]] = rev_ids[first_at[rev_ids] == back[s:]][pick[a:b]]
    except IndexError:
        raise ValueError("top-k blob: a pointer names a missing reference entry (corrupt or wrong input_ids)") from None
    return values[out[: L * K].reshape(L, K)]
