"""Top-k codec: exact ids, bounded KL, ordering, consistency with lse, corruption, manifest round trip."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from ddk_offline.format.codec import CODEC_NAME, LAYOUT_VERSION, CodecConfig, TopKCodec

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
def test_round_trip_ids_exact_and_kl_small(k, id_dtype, logit_dtype):
    vocab = 5000
    ids, logits, lse = realistic_rows(48, k, vocab, seed=k)
    logits = logits.astype(logit_dtype)
    codec = TopKCodec(vocab_size=vocab, k=k)
    out_ids, out_logits = codec.decode(codec.encode(ids.astype(id_dtype), logits, lse), lse)
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


@pytest.mark.parametrize("k", [1, 16, 64])
def test_ids_up_to_2_pow_24(k):
    vocab = 2**24
    rng = np.random.default_rng(1)
    L = 9
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(L)])
    ids[0, 0], ids[1, -1] = vocab - 1, 0  # both ends of the id range
    logits = rng.normal(0, 3, (L, k)).astype(np.float32)
    lse = (np.logaddexp.reduce(logits.astype(np.float64), axis=1) + 2.0).astype(np.float32)
    codec = TopKCodec(vocab_size=vocab, k=k)
    out_ids, out_logits = codec.decode(codec.encode(ids, logits, lse), lse)
    assert (np.sort(out_ids, 1) == np.sort(ids, 1)).all()
    assert out_ids.max() == vocab - 1 and out_ids.min() == 0


def test_ties_keep_all_ids_and_equal_logits():
    k, L = 16, 5
    ids = np.arange(L * k).reshape(L, k)[:, ::-1].copy()
    logits = np.zeros((L, k), np.float32)
    logits[:, :8] = 1.5  # two exact tie groups per row
    lse = (np.logaddexp.reduce(logits.astype(np.float64), axis=1) + 1.0).astype(np.float32)
    codec = TopKCodec(vocab_size=1000, k=k)
    out_ids, out_logits = codec.decode(codec.encode(ids, logits, lse), lse)
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
    out_ids, out_logits = codec.decode(codec.encode(ids, logits, lse), lse)
    assert (out_ids[:, 0] == ids[:, 0]).all()
    assert np.abs(out_logits[:, 0] - logits[:, 0]).max() < 1e-4
    assert (out_logits[:, 1:] < out_logits[:, :1] - 25).all()
    assert np.isfinite(out_logits).all()


def test_single_position_and_neg_inf_logits():
    k = 8
    ids = np.arange(k)[None]
    logits = np.array([[3.0, 1.0, 0.5, -1.0, -2.0, -5.0, -np.inf, -np.inf]], np.float32)
    lse = np.array([4.0], np.float32)
    codec = TopKCodec(vocab_size=100, k=k)
    out_ids, out_logits = codec.decode(codec.encode(ids, logits, lse), lse)
    assert out_ids.shape == (1, k) and list(out_ids[0, :6]) == [0, 1, 2, 3, 4, 5]
    assert np.isfinite(out_logits).all() and (out_logits[0, 6:] < logits[0, 0] - 70).all()


def test_corrupt_or_truncated_blob_raises():
    ids, logits, lse = realistic_rows(16, 16, 3000)
    codec = TopKCodec(vocab_size=3000, k=16)
    blob = codec.encode(ids, logits, lse)
    for bad in (blob[:-1], blob[:10], b"", blob[:40] + bytes([blob[40] ^ 1]) + blob[41:], blob + b"\0"):
        with pytest.raises(ValueError, match="blob"):
            codec.decode(bad, lse)
    # Structurally wrong but with a valid checksum (a writer bug, not bit rot): still a clear ValueError.
    for offset, value in ((6, 1), (12, 10**6), (5, 3)):  # L, table size, stream count
        body = bytearray(blob[:-4])
        fmt = {6: "<I", 12: "<I", 5: "<B"}[offset]
        struct.pack_into(fmt, body, offset, value)
        with pytest.raises(ValueError):
            codec.decode(bytes(body) + struct.pack("<I", zlib.crc32(body)), lse)
    with pytest.raises(ValueError, match="k=16"):
        TopKCodec(vocab_size=3000, k=8).decode(blob, lse)
    with pytest.raises(ValueError, match="lse"):
        codec.decode(blob, lse[:-1])


def test_bad_input_is_refused():
    codec = TopKCodec(vocab_size=10, k=2)
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
    assert again.encode(ids, logits, lse) == codec.encode(ids, logits, lse)
    with pytest.raises(ValueError, match="not 'ddk-topk'"):
        TopKCodec.from_description({**desc, "version": 99}, vocab_size=500, k=16)
    with pytest.raises(ValueError, match="unknown fields"):
        CodecConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="step_top"):
        CodecConfig(step_top=1.0, step_max=0.5)
    with pytest.raises(ValueError, match="mass_step"):
        CodecConfig(mass_step=1e-9)


def test_compresses_well_below_fp16_on_realistic_rows():
    """Sanity on size (not the target, which is measured on the real teacher by pipelines/bench_dump.py)."""
    ids, logits, lse = realistic_rows(256, 64, 49152)
    blob = TopKCodec(vocab_size=49152, k=64).encode(ids, logits, lse)
    assert len(blob) / ids.size < 3.0  # fp16 logits + int32 ids under zstd take ~2.9 B/entry on real data
