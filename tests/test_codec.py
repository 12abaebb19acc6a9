"""Top-k codec: exact ids, bounded KL, ordering, consistency with lse, corruption, manifest round trip,
layouts 1 and 2 (text context: reference rows, next-token slot, pointer chains), v1 back-compatibility."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from ddk_offline.format.codec import CODEC_NAME, LAYOUT_VERSION, CodecConfig, TopKCodec
from ddk_offline.format.codec_context import MAX_REFS, reference_rows, resolve_references

KS = [1, 16, 64, 128]
ID_DTYPES = [np.int32, np.int64]
LOGIT_DTYPES = [np.float32, np.float16, np.float64]


def realistic_rows(L: int, k: int, vocab: int, seed: int = 0):
    """Rows shaped like a real LM's: Zipf-like logits over a Zipf-popular vocabulary, varied confidence.

    Returns ids [L, k] int64 (shuffled order), logits [L, k] float32 and lse [L] float32 of the full row.
    """
    rng = np.random.default_rng(seed)
    full_v = min(vocab, 2048)  # the full-row lse needs the whole row; a 2k-token row keeps it cheap
    ids = np.empty((L, k), np.int64)
    logits = np.empty((L, k), np.float32)
    lse = np.empty(L, np.float32)
    popularity = 1.0 / np.arange(1, vocab + 1) ** 1.1
    popularity /= popularity.sum()
    for n in range(L):
        cand = rng.choice(vocab, size=full_v, replace=False, p=popularity)
        sharp = rng.uniform(0.3, 3.0)
        row = (-sharp * np.log1p(rng.permutation(full_v)) + rng.normal(0, 0.3, full_v)).astype(np.float32) * 2
        top = np.argsort(-row, kind="stable")[:k]
        perm = rng.permutation(k)
        ids[n], logits[n] = cand[top][perm], row[top][perm]
        lse[n] = np.logaddexp.reduce(row.astype(np.float64))
    return ids, logits, lse


def text_context(ids: np.ndarray, seed: int = 0, repeat: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Input ids shaped like text for rows ``ids`` [L, k], and rows that repeat like text's contexts do.

    Tokens come from a small alphabet (so same-token and bigram references exist); the next token is one of the
    row's top ids in most rows (as for a real teacher); every ``repeat``-th row copies the id set of the last row
    with the same token (so pointers into reference rows occur). Returns (input_ids [L], ids [L, k]).
    """
    rng = np.random.default_rng(seed)
    L, k = ids.shape
    ids = ids.copy()
    tokens = rng.integers(0, 7, L)
    for n in range(L - 1):
        if rng.random() < 0.7:
            tokens[n + 1] = ids[n, min(int(rng.geometric(0.5)) - 1, k - 1)]
    last: dict[int, int] = {}
    for n in range(L):
        m = last.get(int(tokens[n]))
        if m is not None and n % repeat == 0:
            ids[n] = rng.permutation(ids[m])
        last[int(tokens[n])] = n
    return tokens, ids


def kl_renorm(exact_logits: np.ndarray, decoded_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """KL(softmax(exact / T) || softmax(decoded / T)) per row over the same k ids (aligned columns)."""

    def log_softmax(x):
        x = x.astype(np.float64) / temperature
        return x - np.logaddexp.reduce(x, axis=1, keepdims=True)

    lp, lq = log_softmax(exact_logits), log_softmax(decoded_logits)
    return (np.exp(lp) * (lp - lq)).sum(1)


def align(ids: np.ndarray, logits: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    """Reorder each row's logits so that column j belongs to ref_ids[:, j] (same id sets required)."""
    order = np.argsort(ids, axis=1)
    sorted_ids = np.take_along_axis(ids, order, 1)
    pos = np.stack([np.searchsorted(sorted_ids[n], ref_ids[n]) for n in range(ids.shape[0])])
    assert (np.take_along_axis(sorted_ids, pos, 1) == ref_ids).all(), "decoded id sets differ from the input"
    return np.take_along_axis(np.take_along_axis(logits, order, 1), pos, 1)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("logit_dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("layout", [1, 2])
def test_round_trip_ids_exact_and_kl_small(k, id_dtype, logit_dtype, layout):
    vocab = 5000
    ids, logits, lse = realistic_rows(48, k, vocab, seed=k)
    tokens, ids = text_context(ids, seed=k)
    logits = logits.astype(logit_dtype)
    codec = TopKCodec(vocab_size=vocab, k=k, layout=layout)
    blob = codec.encode(ids.astype(id_dtype), logits, lse, tokens.astype(id_dtype))
    assert blob[4] == layout
    out_ids, out_logits = codec.decode(blob, lse, tokens)
    assert out_ids.dtype == np.int64 and out_logits.dtype == np.float32
    assert out_ids.shape == out_logits.shape == (48, k)
    assert (np.sort(out_ids, 1) == np.sort(ids, 1)).all()
    assert (np.diff(out_logits, axis=1) <= 0).all(), "rows must come back in descending-logit order"
    decoded = align(out_ids, out_logits, ids)
    if k > 1:
        kl = kl_renorm(logits, decoded)
        assert kl.mean() < 1e-3, f"mean KL {kl.mean():.2e}"
        assert kl_renorm(logits, decoded, 2.0).mean() < 2e-3
    # Consistent with lse: probabilities never sum past 1, and the top-k mass is kept to ~1/64 in logit.
    mass = np.exp(decoded.astype(np.float64) - lse[:, None]).sum(1)
    exact = np.exp(logits.astype(np.float64) - lse[:, None]).sum(1)
    assert (mass <= 1 + 1e-5).all()  # fp32 rounding of the output logits only
    ok = exact < 1 - 1e-3  # away from mass 1, where fp32 logits cannot resolve the tail
    mass, exact = mass[ok], exact[ok]
    logit_err = np.abs(np.log(mass / (1 - mass)) - np.log(exact / (1 - exact)))
    assert logit_err.max(initial=0) <= CodecConfig().mass_step / 2 + 1e-3


def round_trip(codec: TopKCodec, ids, logits, lse, tokens=None):
    """decode(encode(...)) with the row's input ids (layout 2 needs them; arange when the test has no text)."""
    tokens = np.arange(len(ids)) if tokens is None else tokens
    return codec.decode(codec.encode(ids, logits, lse, tokens), lse, tokens)


@pytest.mark.parametrize("k", [1, 16, 64])
@pytest.mark.parametrize("layout", [1, 2])
def test_ids_up_to_2_pow_24(k, layout):
    vocab = 2**24
    rng = np.random.default_rng(1)
    L = 9
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(L)])
    ids[0, 0], ids[1, -1] = vocab - 1, 0  # both ends of the id range
    ids[4], ids[7] = rng.permutation(ids[1]), ids[1]  # same-token rows below: pointers to ids near 2^24
    tokens = np.array([vocab - 1, 5, vocab - 1, 3, 5, ids[4, 0], 8, 5, 9])
    logits = rng.normal(0, 3, (L, k)).astype(np.float32)
    lse = (np.logaddexp.reduce(logits.astype(np.float64), axis=1) + 2.0).astype(np.float32)
    codec = TopKCodec(vocab_size=vocab, k=k, layout=layout)
    out_ids, out_logits = round_trip(codec, ids, logits, lse, tokens)
    assert (np.sort(out_ids, 1) == np.sort(ids, 1)).all()
    assert out_ids.max() == vocab - 1 and out_ids.min() == 0


@pytest.mark.parametrize("layout", [1, 2])
def test_ties_keep_all_ids_and_equal_logits(layout):
    k, L = 16, 5
    ids = np.arange(L * k).reshape(L, k)[:, ::-1].copy()
    ids[3] = ids[1]  # a repeated row: its tie groups are pointers
    logits = np.zeros((L, k), np.float32)
    logits[:, :8] = 1.5  # two exact tie groups per row
    lse = (np.logaddexp.reduce(logits.astype(np.float64), axis=1) + 1.0).astype(np.float32)
    codec = TopKCodec(vocab_size=1000, k=k, layout=layout)
    out_ids, out_logits = round_trip(codec, ids, logits, lse, np.array([1, 2, 3, 2, 4]))
    assert (np.sort(out_ids, 1) == np.sort(ids, 1)).all()
    assert (np.diff(out_logits, axis=1) <= 0).all()
    decoded = align(out_ids, out_logits, ids)
    assert np.ptp(decoded[:, :8], axis=1).max() == 0 and np.ptp(decoded[:, 8:], axis=1).max() == 0
    assert kl_renorm(logits, decoded).max() < 1e-3


def test_confident_rows_stay_exact():
    """One token with p ~ 1: its logit is kept, the others stay far below, the tail stays positive."""
    k, L = 64, 4
    rng = np.random.default_rng(2)
    ids = np.stack([rng.choice(1000, size=k, replace=False) for _ in range(L)])
    logits = np.concatenate([np.full((L, 1), 30.0), rng.uniform(-10, 0, (L, k - 1))], 1).astype(np.float32)
    lse = np.logaddexp.reduce(logits.astype(np.float64), axis=1).astype(np.float32)  # tail mass ~ 0 in fp32
    codec = TopKCodec(vocab_size=1000, k=k)
    out_ids, out_logits = round_trip(codec, ids, logits, lse, np.r_[7, ids[:-1, 0]])  # next token = the top id
    assert (out_ids[:, 0] == ids[:, 0]).all()
    assert np.abs(out_logits[:, 0] - logits[:, 0]).max() < 1e-4
    assert (out_logits[:, 1:] < out_logits[:, :1] - 25).all()
    assert np.isfinite(out_logits).all()


@pytest.mark.parametrize("layout", [1, 2])
def test_single_position_and_neg_inf_logits(layout):
    k = 8
    ids = np.arange(k)[None]
    logits = np.array([[3.0, 1.0, 0.5, -1.0, -2.0, -5.0, -np.inf, -np.inf]], np.float32)
    lse = np.array([4.0], np.float32)
    codec = TopKCodec(vocab_size=100, k=k, layout=layout)
    out_ids, out_logits = round_trip(codec, ids, logits, lse, np.array([3]))
    assert out_ids.shape == (1, k) and list(out_ids[0, :6]) == [0, 1, 2, 3, 4, 5]
    assert np.isfinite(out_logits).all() and (out_logits[0, 6:] < logits[0, 0] - 70).all()


def test_reference_rows():
    """Bigram row, same-token row, previous row, then the same-token chain; each row listed once."""
    tokens = np.array([5, 6, 5, 7, 5, 6, 5, 5])
    refs = reference_rows(tokens)
    assert refs.shape == (8, MAX_REFS)
    want = {
        0: [],
        1: [0],  # previous only
        2: [0, 1],  # same token 0, previous 1
        3: [2],  # a new token: previous only
        4: [2, 3, 0],  # (7, 5) is new; same token 2, previous 3, 2's same token 0
        5: [1, 4],  # (5, 6) last ended at row 1, which is also the same-token row: listed once; previous 4
        6: [2, 4, 5, 0],  # (6, 5) ended at row 2; same token 4; previous 5; 4's same token is 2 again, then 0
        7: [6, 4, 2],  # (5, 5) is new; same token 6 (= previous); then the chain 4, 2
    }
    for n, rows in want.items():
        assert refs[n].tolist() == rows + [-1] * (MAX_REFS - len(rows)), (n, refs[n])


def test_pointer_chains_and_next_token_slots():
    """Rows that repeat all along the sequence resolve through long pointer chains, exactly."""
    rng = np.random.default_rng(3)
    k, L = 16, 200
    base = rng.choice(3000, size=k, replace=False)
    ids = np.stack([rng.permutation(base) for _ in range(L)])
    logits = rng.normal(0, 2, (L, k)).astype(np.float32)
    lse = (np.logaddexp.reduce(logits.astype(np.float64), axis=1) + 1.0).astype(np.float32)
    tokens = base[rng.integers(0, k, L)]  # every next token is in its row
    codec = TopKCodec(vocab_size=3000, k=k)
    blob = codec.encode(ids, logits, lse, tokens)
    out_ids, out_logits = codec.decode(blob, lse, tokens)
    assert (np.sort(out_ids, 1) == np.sort(ids, 1)).all()
    assert kl_renorm(logits, align(out_ids, out_logits, ids)).mean() < 1e-3
    assert struct.unpack_from("<I", blob, 12)[0] < k  # only row 0 uses the table: the rest are pointers


def test_layout2_smaller_than_layout1_on_text_like_rows():
    ids, logits, lse = realistic_rows(256, 64, 49152, seed=4)
    tokens, ids = text_context(ids, seed=4, repeat=3)
    v1 = TopKCodec(vocab_size=49152, k=64, layout=1).encode(ids, logits, lse)
    v2 = TopKCodec(vocab_size=49152, k=64).encode(ids, logits, lse, tokens)
    assert len(v2) < len(v1)


def test_layout2_needs_the_input_ids_it_was_written_with():
    ids, logits, lse = realistic_rows(16, 16, 3000)
    tokens, ids = text_context(ids)
    codec = TopKCodec(vocab_size=3000, k=16)
    with pytest.raises(ValueError, match="input_ids"):
        codec.encode(ids, logits, lse)
    with pytest.raises(ValueError, match="input_ids"):
        codec.encode(ids, logits, lse, tokens[:-1])
    blob = codec.encode(ids, logits, lse, tokens)
    with pytest.raises(ValueError, match="input_ids"):
        codec.decode(blob, lse)
    with pytest.raises(ValueError, match="input_ids"):
        codec.decode(blob, lse, tokens.astype(np.float32))
    # Other input ids give other reference rows: the ids come out wrong (or the blob is refused); they are
    # not covered by the checksum, which is why the reader passes each row's own input_ids.
    other = np.roll(tokens, 1)
    try:
        assert not (np.sort(codec.decode(blob, lse, other)[0], 1) == np.sort(ids, 1)).all()
    except ValueError:
        pass


def test_resolve_references_refuses_a_pointer_past_the_live_entries():
    ids = np.array([[5, 6, 7], [0, 0, 9]])  # row 1: two pointers into row 0, then table id 9
    refs = reference_rows(np.array([1, 2]))
    next_token = np.array([3, 7])  # row 1's next token is 7 (its index 0), so its live entries are 5 and 6
    pointer = np.array([[-1, -1, -1], [1, 0, -1]])
    out = resolve_references(ids, pointer, refs, next_token, vocab_size=10)
    assert out.tolist() == [[5, 6, 7], [6, 5, 9]]
    with pytest.raises(ValueError, match="missing reference"):
        resolve_references(ids, np.array([[-1, -1, -1], [2, 0, -1]]), refs, next_token, vocab_size=10)
    with pytest.raises(ValueError, match="missing reference"):  # row 0 has no reference rows at all
        resolve_references(ids, np.array([[0, -1, -1], [-1, -1, -1]]), refs, next_token, vocab_size=10)


def _resolve_by_definition(ids, pointer, refs, next_token):
    """resolve_references spelled out (docs/CODEC.md): row by row, pointer p names the p-th id of the row's
    reference rows, concatenated, that is neither the next token nor listed earlier."""
    out = ids.copy()
    for n in range(len(out)):
        live, seen = [], {int(next_token[n])}
        for x in (int(x) for r in refs[n] if r >= 0 for x in out[r]):
            if x not in seen:
                seen.add(x)
                live.append(x)
        for j in np.flatnonzero(pointer[n] >= 0):
            out[n, j] = live[pointer[n, j]]
    return out


def _random_pointer_rows(rng, L: int, K: int, vocab: int, text_vocab: int):
    """Valid resolve_references input: random ids and text, each entry a pointer with probability 1/2 (a
    uniform live index of its row, so chains of pointers through pointers run as deep as the text allows)."""
    tokens = rng.integers(0, text_vocab, L)
    refs = reference_rows(tokens)
    next_token = np.append(tokens[1:], -1)
    ids = rng.integers(0, vocab, (L, K))
    pointer = np.full((L, K), -1)
    decoded = ids.copy()
    for n in range(L):
        seen = {int(next_token[n])}
        live = [x for x in (int(x) for r in refs[n] if r >= 0 for x in decoded[r]) if x not in seen and not seen.add(x)]
        for j in range(K):
            if live and rng.random() < 0.5:
                pointer[n, j] = rng.integers(0, len(live))
                decoded[n, j] = live[pointer[n, j]]
    return ids, pointer, refs, next_token, decoded


@pytest.mark.parametrize("L,K,text_vocab", [(1, 4, 3), (2, 1, 1), (40, 8, 3), (64, 5, 1), (30, 16, 50)])
def test_resolve_references_matches_its_definition(L, K, text_vocab):
    # text_vocab 1: every row's same-token chain runs through all earlier rows (the longest pointer chains).
    rng = np.random.default_rng(L * 1000 + K)
    for _ in range(3):
        ids, pointer, refs, next_token, decoded = _random_pointer_rows(rng, L, K, 12, text_vocab)
        assert np.array_equal(_resolve_by_definition(ids, pointer, refs, next_token), decoded)
        assert np.array_equal(resolve_references(ids, pointer, refs, next_token, vocab_size=12), decoded)
        if (pointer >= 0).any():  # one pointer past its row's live entries: refused, not wrapped around
            bad = pointer.copy()
            bad.reshape(-1)[np.flatnonzero(pointer >= 0)[-1]] += 10 * K
            with pytest.raises(ValueError, match="missing reference"):
                resolve_references(ids, bad, refs, next_token, vocab_size=12)


# A layout-1 blob written by ddk-offline 0.1 (before layout 2 existed): L = 6, k = 4, vocab 50.
V1_BLOB = bytes.fromhex(
    "444b544b011406000000040013000000170000000000000012000000000000000f000000020000000c0000000000000019000000"
    "030000000f00000001000000190000000200000009000000000000000b00000001000000000000000000000028b52ffd20137500"
    "003281028402221089ba5dc9060e0028b52ffd20134d000032410181016140080028b52ffd20063100000f0f0f0f0f0f555028b5"
    "2ffd2003190000ffeec028b52ffd201081000005060d0f0e100a090908040c0e06060820624028b52ffd20063100000404040109"
    "098028b52ffd201081000003050c080b020c010a080b0207060a0cbc5028b52ffd200001000028b52ffd2002110000010800f87d"
    "feed"
)
V1_LSE = np.array([1.83, 1.16, 1.1, 2.77, 2.61, 3.37], np.float32)
V1_IDS = [[49, 33, 44, 30], [49, 2, 14, 10], [49, 39, 23, 6], [14, 16, 13, 35], [22, 28, 27, 24], [17, 30, 33, 37]]
V1_LOGITS = [
    [0.549409031867981, 0.31071555614471436, -0.48897868394851685, -2.548217535018921],
    [-0.09691345691680908, -0.3869650065898895, -1.061065912246704, -5.190582275390625],
    [0.2342926263809204, -0.9613813757896423, -2.0135674476623535, -3.087169885635376],
    [2.134127378463745, -0.11373291909694672, -1.7279157638549805, -1.7279157638549805],
    [1.7727359533309937, 0.2196783572435379, -0.21576862037181854, -1.1236035823822021],
    [2.7209179401397705, 0.1749866008758545, 0.1749866008758545, -2.372750997543335],
]


def test_layout1_blobs_still_decode():
    """Existing dumps hold layout-1 blobs: a codec rebuilt from their manifest reads them, without input ids."""
    old_manifest = {
        "name": CODEC_NAME,
        "version": 1,
        "config": {
            "step_top": 0.045,
            "step_max": 0.5,
            "mass_step": 1 / 32,
            "eg_precision": 2,
            "zstd_level": 3,
            "zstd_level_small": 19,
        },
    }
    codec = TopKCodec.from_description(old_manifest, vocab_size=50, k=4)
    assert codec.layout == 1 and codec.describe() == old_manifest and V1_BLOB[4] == 1
    out_ids, out_logits = codec.decode(V1_BLOB, V1_LSE)
    assert out_ids.tolist() == V1_IDS
    np.testing.assert_allclose(out_logits, np.array(V1_LOGITS, np.float32), rtol=0, atol=1e-6)
    # The blob says its layout, so a layout-2 codec with the same config reads it too (input ids unused).
    layout2 = TopKCodec(CodecConfig(mass_step=1 / 32), vocab_size=50, k=4)
    assert layout2.layout == 2
    again_ids, again_logits = layout2.decode(V1_BLOB, V1_LSE, np.arange(6))
    assert (again_ids == out_ids).all() and (again_logits == out_logits).all()


@pytest.mark.parametrize("layout", [1, 2])
def test_corrupt_or_truncated_blob_raises(layout):
    ids, logits, lse = realistic_rows(16, 16, 3000)
    tokens, ids = text_context(ids)
    codec = TopKCodec(vocab_size=3000, k=16, layout=layout)
    blob = codec.encode(ids, logits, lse, tokens)
    for bad in (blob[:-1], blob[:10], b"", blob[:40] + bytes([blob[40] ^ 1]) + blob[41:], blob + b"\0"):
        with pytest.raises(ValueError, match="blob"):
            codec.decode(bad, lse, tokens)
    # Structurally wrong but with a valid checksum (a writer bug, not bit rot): still a clear ValueError.
    for offset, value in ((6, 1), (12, 10**6), (5, 3), (4, 3)):  # L, table size, stream count, layout
        body = bytearray(blob[:-4])
        fmt = {6: "<I", 12: "<I", 5: "<B", 4: "<B"}[offset]
        struct.pack_into(fmt, body, offset, value)
        with pytest.raises(ValueError):
            codec.decode(bytes(body) + struct.pack("<I", zlib.crc32(body)), lse, tokens)
    # Every single-byte change inside the streams, re-checksummed: a ValueError or a decode, never a crash.
    head = 16 + 4 * blob[5]
    for pos in range(head, len(blob) - 4, 7):
        body = bytearray(blob[:-4])
        body[pos] ^= 0x5A
        try:
            codec.decode(bytes(body) + struct.pack("<I", zlib.crc32(body)), lse, tokens)
        except ValueError:
            pass
    with pytest.raises(ValueError, match="k=16"):
        TopKCodec(vocab_size=3000, k=8).decode(blob, lse, tokens)
    with pytest.raises(ValueError, match="lse"):
        codec.decode(blob, lse[:-1], tokens)


def test_bad_input_is_refused():
    codec = TopKCodec(vocab_size=10, k=2, layout=1)
    lse = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="repeats an id"):
        codec.encode(np.array([[3, 3]]), np.zeros((1, 2), np.float32), lse)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        codec.encode(np.array([[3, 10]]), np.zeros((1, 2), np.float32), lse)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([[3, 4]]), np.array([[np.nan, 0]], np.float32), lse)
    with pytest.raises(ValueError, match=r"\[L, 2\]"):
        codec.encode(np.array([[3, 4, 5]]), np.zeros((1, 3), np.float32), lse)


def test_describe_round_trip_and_config_json():
    cfg = CodecConfig(step_top=0.03, step_max=0.4, zstd_level=5)
    codec = TopKCodec(cfg, vocab_size=500, k=16)
    desc = json.loads(json.dumps(codec.describe()))
    assert desc["name"] == CODEC_NAME and desc["version"] == LAYOUT_VERSION
    again = TopKCodec.from_description(desc, vocab_size=500, k=16)
    assert again.config == cfg
    ids, logits, lse = realistic_rows(8, 16, 500)
    tokens = np.arange(8)
    assert again.encode(ids, logits, lse, tokens) == codec.encode(ids, logits, lse, tokens)
    with pytest.raises(ValueError, match="not 'ddk-topk'"):
        TopKCodec.from_description({**desc, "version": 99}, vocab_size=500, k=16)
    with pytest.raises(ValueError, match="unknown fields"):
        CodecConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="step_top"):
        CodecConfig(step_top=1.0, step_max=0.5)
    with pytest.raises(ValueError, match="mass_step"):
        CodecConfig(mass_step=1e-9)
    with pytest.raises(ValueError, match="layout"):
        TopKCodec(vocab_size=500, k=16, layout=3)


def test_compresses_well_below_fp16_on_realistic_rows():
    """Sanity on size (not the target, which is measured on the real teacher by pipelines/bench_dump.py)."""
    ids, logits, lse = realistic_rows(256, 64, 49152)
    blob = TopKCodec(vocab_size=49152, k=64).encode(ids, logits, lse, np.arange(256))
    assert len(blob) / ids.size < 3.0  # fp16 logits + int32 ids under zstd take ~2.9 B/entry on real data
