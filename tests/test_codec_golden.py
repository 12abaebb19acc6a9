"""Golden bytes of the top-k codec: the blobs (and decoded arrays) of a fixed, varied set of inputs, pinned by
sha256 as the codec wrote them before its speed work (commit 77ff546). Any change to the bytes fails here: a
faster codec must write exactly the same blobs (no format change), and decode them to exactly the same arrays.

Regenerate only for a deliberate layout change (which also bumps ``LAYOUT_VERSION``):
``PYTHONPATH=.:kernels python tests/test_codec_golden.py`` prints the table.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ddk_offline.format.codec import CodecConfig, TopKCodec


def golden_case(L: int, k: int, vocab: int, pattern: str, seed: int, presorted: bool = False):
    """One synthetic sequence shaped like a teacher's top-k.

    Args:
        L: positions; k: entries per row; vocab: vocabulary size.
        pattern: "random" (Zipf-popular ids, random input tokens), "text" (input tokens from a small alphabet,
            the next token usually in the row, every 5th row a permutation of an earlier same-token row's ids:
            the layout-2 pointers), "ties" (logits on a coarse grid: long tie groups and duplicate values) or
            "tail" (as "text", with -inf logits at the end of some rows and confident rows).
        seed: generator seed.
        presorted: rows in descending-logit order (the dump's case) instead of shuffled.

    Returns:
        ids [L, k] int64 (shuffled order), logits [L, k] float32, lse [L] float32, input_ids [L] int64.
    """
    rng = np.random.default_rng(seed)
    pool = rng.choice(vocab, size=min(vocab, max(4 * k, 600)), replace=False)
    weight = np.log(1.0 / np.arange(1, pool.size + 1) ** 1.2)
    ids = np.empty((L, k), np.int64)
    for n in range(L):  # Gumbel top-k: k distinct, Zipf-popular ids
        ids[n] = pool[np.argsort(-(weight + rng.gumbel(size=pool.size)))[:k]]
    sharp = rng.uniform(0.2, 3.0, (L, 1))
    logits = 20.0 - sharp * np.log1p(np.arange(k))[None] * 2 + rng.normal(0, 0.3, (L, k))
    if pattern == "ties":
        logits = np.round(logits * 2) / 2
        logits[:, k // 2 :] = logits[:, k // 2 : k // 2 + 1]
    tokens = rng.integers(0, vocab, L)
    if pattern in ("text", "tail"):
        tokens = pool[rng.integers(0, 6, L)]
        for n in range(L - 1):
            if rng.random() < 0.8:
                tokens[n + 1] = ids[n, min(int(rng.geometric(0.5)) - 1, k - 1)]
        last: dict[int, int] = {}
        for n in range(L):
            m = last.get(int(tokens[n]))
            if m is not None and n % 5 == 0:
                ids[n] = ids[m]
                logits[n] = logits[m] + rng.normal(0, 0.05, k)
            last[int(tokens[n])] = n
    if pattern == "tail":
        logits[::7, k - k // 4 :] = -np.inf
        logits[::3, 0] += 30.0  # confident rows: top-k mass ~ 1
    perm = np.argsort(rng.random((L, k)), axis=1)
    if presorted:  # as a teacher's torch.topk(sorted=True) hands them over (ties in any order)
        perm = np.argsort(-logits + 0.0 * perm, axis=1, kind="stable")
    ids, logits = np.take_along_axis(ids, perm, 1), np.take_along_axis(logits, perm, 1).astype(np.float32)
    lse = (np.logaddexp.reduce(logits.astype(np.float64), axis=1) + rng.exponential(0.5, L)).astype(np.float32)
    return ids, logits, lse, tokens.astype(np.int64)


_CONFIGS = {
    "default": CodecConfig(),
    "fine": CodecConfig(step_top=0.01, step_max=0.2, mass_step=2**-10, eg_precision=0),
    "coarse": CodecConfig(step_top=0.5, step_max=5.0, mass_step=1.0, eg_precision=3, zstd_level=1),
}


def _cases() -> list[tuple]:
    """(name, L, k, vocab, pattern, seed, config name, layout): k in {1, 8, 64, 128}, vocabularies up to 2^24."""
    out = []
    seed = 0
    for layout in (1, 2):
        for k, L in ((1, 200), (8, 150), (64, 96), (128, 40)):
            for vocab in (49152, 262144, 2**24 - 1):
                for pattern in ("random", "text"):
                    seed += 1
                    out.append((f"v{layout}-k{k}-V{vocab}-{pattern}", L, k, vocab, pattern, seed, "default", layout))
        for k in (8, 64):
            for pattern in ("ties", "tail"):
                seed += 1
                out.append((f"v{layout}-k{k}-{pattern}", 120, k, 49152, pattern, seed, "default", layout))
        for L in (1, 2):
            seed += 1
            out.append((f"v{layout}-L{L}", L, 16, 49152, "text", seed, "default", layout))
        for cfg in ("fine", "coarse"):
            seed += 1
            out.append((f"v{layout}-{cfg}", 64, 32, 262144, "text", seed, cfg, layout))
        seed += 1
        out.append((f"v{layout}-k128-V130", 50, 128, 130, "text", seed, "default", layout))  # k near V: dense rows
        seed += 1
        out.append((f"v{layout}-k64-L1024", 1024, 64, 49152, "text", seed, "default", layout))
    seed = 1000
    for layout in (1, 2):  # rows already in descending-logit order, as the dump passes them
        for k in (8, 64, 128):
            for pattern in ("text", "ties", "tail"):
                seed += 1
                name = f"v{layout}-k{k}-{pattern}-sorted"
                out.append((name, 100, k, 49152, pattern + "+sorted", seed, "default", layout))
    return out


CASES = _cases()


def blob_and_decoded_sha(case: tuple) -> tuple[str, str]:
    """sha256 of the encoded blob and of the decoded ids + logits bytes."""
    _, L, k, vocab, pattern, seed, cfg, layout = case
    pattern, _, order = pattern.partition("+")
    ids, logits, lse, tokens = golden_case(L, k, vocab, pattern, seed, presorted=order == "sorted")
    codec = TopKCodec(_CONFIGS[cfg], vocab_size=vocab, k=k, layout=layout)
    blob = codec.encode(ids, logits, lse, tokens)
    dec_ids, dec_logits = codec.decode(blob, lse, tokens)
    assert dec_ids.dtype == np.int64 and dec_logits.dtype == np.float32 and dec_ids.shape == (L, k)
    np.testing.assert_array_equal(np.sort(dec_ids, 1), np.sort(ids, 1))  # ids exact (as a set per row)
    decoded = hashlib.sha256(dec_ids.tobytes() + dec_logits.tobytes()).hexdigest()
    return hashlib.sha256(blob).hexdigest(), decoded


# name -> (blob sha256, decoded sha256), written by the codec of commit 77ff546 (before the speed work).
GOLDEN: dict[str, tuple[str, str]] = {
    "v1-k1-V49152-random": ("bd7ef814d1af8cfc", "fc323cdd42692577"),
    "v1-k1-V49152-text": ("be5da051209832f5", "f8933fe6543b8ee8"),
    "v1-k1-V262144-random": ("a83eedc6d4f833e6", "f38e0be88fb4d249"),
    "v1-k1-V262144-text": ("2e935d1a6a9b15d3", "86de287bfd5df09c"),
    "v1-k1-V16777215-random": ("27f804a8409a3aa4", "95ac3c0bd6a7682a"),
    "v1-k1-V16777215-text": ("abbfad1511146662", "dd5730f878d97cce"),
    "v1-k8-V49152-random": ("012fdd7d8f311782", "894f334e7b9485c3"),
    "v1-k8-V49152-text": ("d9f0e5a55bd33345", "5498f565e7c63e37"),
    "v1-k8-V262144-random": ("320c72d935aec270", "9a3bccf99bb5819b"),
    "v1-k8-V262144-text": ("a50561cf2550bc10", "b712f62f65e9dae5"),
    "v1-k8-V16777215-random": ("a19faec26bde1b08", "c971f3c4c3b1c045"),
    "v1-k8-V16777215-text": ("e6bab0d829f2eb08", "33ee8669490e7161"),
    "v1-k64-V49152-random": ("3d33503821949d03", "ebf0c94a69f00367"),
    "v1-k64-V49152-text": ("81baaca4942becba", "f4663a9f6e500af8"),
    "v1-k64-V262144-random": ("b31e0eed9767b563", "5c82751d94fbd4ca"),
    "v1-k64-V262144-text": ("d12fae20483841a6", "af19fd7a208cb0a3"),
    "v1-k64-V16777215-random": ("4b31e3434c6ad6ca", "fddd0b961a8670bc"),
    "v1-k64-V16777215-text": ("eeaa6825d8c3ab2e", "c9faf338250c30ba"),
    "v1-k128-V49152-random": ("163b2f4e498b4870", "77cbaed10e11ee54"),
    "v1-k128-V49152-text": ("7be6241c4bb3345d", "133b8cff286bdc82"),
    "v1-k128-V262144-random": ("19093b3d9a319518", "2f2834b80f33b700"),
    "v1-k128-V262144-text": ("7899b3268e4860a0", "b15dd6dd17cbb616"),
    "v1-k128-V16777215-random": ("108cb61936c63bff", "08686699db2e2996"),
    "v1-k128-V16777215-text": ("fac41e49f885d57e", "4824fd8a4b7e4502"),
    "v1-k8-ties": ("db92d9e2988bc0a7", "f9afd2e1f3e79c2a"),
    "v1-k8-tail": ("a6e0046065a08bc9", "4a4b16d49e8ce4bb"),
    "v1-k64-ties": ("12eed34b63b996f1", "a4f8764b3b8d10ad"),
    "v1-k64-tail": ("2bb38e3e388d9bc4", "abb392e8ae59ca15"),
    "v1-L1": ("a3702158d3548111", "172c2a418d052b1e"),
    "v1-L2": ("2eb8d346d7621217", "c257a873b57c8af1"),
    "v1-fine": ("3311f7733980058e", "573e142eb2955f8f"),
    "v1-coarse": ("9cd7767eedc3d7ad", "b9b90d8d6ec48ce7"),
    "v1-k128-V130": ("62e20d80d5004b0c", "393b3e8d1d3d11e5"),
    "v1-k64-L1024": ("6bdb08d67afce218", "c1e67711f9d4d30a"),
    "v2-k1-V49152-random": ("30c3f5fb83e44e60", "e3d3816eb5ad6b3b"),
    "v2-k1-V49152-text": ("053cef1b3995886b", "77b713f6ace92b67"),
    "v2-k1-V262144-random": ("a7575d830389d733", "56c1beca671b1770"),
    "v2-k1-V262144-text": ("444eec05ee6b627e", "b31c9434431469d9"),
    "v2-k1-V16777215-random": ("6e8381501240878f", "3a92668d41d1f201"),
    "v2-k1-V16777215-text": ("35fe4a667f5b7ef8", "2620a71ab96436ed"),
    "v2-k8-V49152-random": ("0db10a2a1eedf1ae", "a963fb44fa5f287d"),
    "v2-k8-V49152-text": ("54a6eb727e405312", "03db8ba124b03e03"),
    "v2-k8-V262144-random": ("5b7e7e06514eb347", "c0165d84d16ee68a"),
    "v2-k8-V262144-text": ("aa8ba6d7cab1d802", "8ab8a5a813e17822"),
    "v2-k8-V16777215-random": ("49763b234b5bcb39", "0bbafc9516bfb3f7"),
    "v2-k8-V16777215-text": ("7c689851c75c26b2", "299901c8c5ccc6e9"),
    "v2-k64-V49152-random": ("999d5960e042b8cd", "402b9f9e67d351a7"),
    "v2-k64-V49152-text": ("e0bfcc008a0131ed", "b3621278979940fb"),
    "v2-k64-V262144-random": ("83ad3d54708d5762", "100f2c03efe4e8e8"),
    "v2-k64-V262144-text": ("22724ecaaddd68e7", "90919d5655b59f6d"),
    "v2-k64-V16777215-random": ("a90306c6cf7cc103", "9820c72245d70031"),
    "v2-k64-V16777215-text": ("14f342654429fc7a", "5f6d593953251343"),
    "v2-k128-V49152-random": ("4f9bcdeb06570446", "bc6557eecc0a04b3"),
    "v2-k128-V49152-text": ("d4d7a2bdf66f4ca0", "91d7dafbda604f56"),
    "v2-k128-V262144-random": ("1f55e680b292357a", "0c4e8b3637a28267"),
    "v2-k128-V262144-text": ("bceef7e65e804ba8", "35024d81c20739e7"),
    "v2-k128-V16777215-random": ("be72dfc2471c7e76", "1a0aa1ca9ea6ba56"),
    "v2-k128-V16777215-text": ("8e60379f238ca162", "4a12a83d152ea37c"),
    "v2-k8-ties": ("149fd157ac9da628", "8feccabba40c90c5"),
    "v2-k8-tail": ("7a217a0e7a193944", "97364797dd4e1c49"),
    "v2-k64-ties": ("13b24f5acc73346e", "9ad39751fd53dd92"),
    "v2-k64-tail": ("78e198f6c7a29f5e", "a0f7f60ebe93e85e"),
    "v2-L1": ("d403eda49b28fa1e", "cddd45659c56833e"),
    "v2-L2": ("f4142076beab7507", "399e12517621e923"),
    "v2-fine": ("23742c6b36161682", "f8fb9737c3cdc124"),
    "v2-coarse": ("d50a450cb1d89f46", "a598604e8f42048f"),
    "v2-k128-V130": ("0e5db791572fdd3e", "73fdf3d4a0ae84ab"),
    "v2-k64-L1024": ("ecf7e6aeb7c05e01", "856459cdd7ccc77f"),
    "v1-k8-text-sorted": ("3299eb65dcd3eee7", "4d61f7b70ada8b85"),
    "v1-k8-ties-sorted": ("86c61d3c2f4dd7f7", "a53a00b2ca64ed54"),
    "v1-k8-tail-sorted": ("0b4cf430d1066f8d", "6a828558a463ceaf"),
    "v1-k64-text-sorted": ("920acf79b5e806e5", "bcce3f1f3e9aca5c"),
    "v1-k64-ties-sorted": ("18e5ab1b4ec412bc", "e192a5c15c4bf963"),
    "v1-k64-tail-sorted": ("298e0ae378285776", "5e917c2f244a0be8"),
    "v1-k128-text-sorted": ("ef2ea42c27896d9a", "2da74f1800ff73df"),
    "v1-k128-ties-sorted": ("9d5064e1b0590025", "5d5f5bf5f55cd387"),
    "v1-k128-tail-sorted": ("ba4dac1132a5fb86", "d700262199764fc9"),
    "v2-k8-text-sorted": ("7bde561be75268d8", "e47f502e75b7533c"),
    "v2-k8-ties-sorted": ("833fc39f5c035e3f", "a4e0a1700d70c12d"),
    "v2-k8-tail-sorted": ("fa1f26e483daee2e", "deb304003cff1183"),
    "v2-k64-text-sorted": ("c7235a8dfceed8d2", "3309463346431959"),
    "v2-k64-ties-sorted": ("d01e246508cef478", "4fe8829695bf6b67"),
    "v2-k64-tail-sorted": ("e18f7a3dd212d2e8", "8c9809a5224e26a6"),
    "v2-k128-text-sorted": ("1336a4aad82fc7b0", "0c9833d4bbce56f3"),
    "v2-k128-ties-sorted": ("7a96254815fc4322", "7fccbe78e37fb0cf"),
    "v2-k128-tail-sorted": ("2139945533cb25b9", "3a0546b07430e73c"),
}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_blob_bytes_and_decoded_arrays_unchanged(case):
    blob_sha, decoded_sha = blob_and_decoded_sha(case)
    assert (blob_sha[:16], decoded_sha[:16]) == GOLDEN[case[0]], f"{case[0]}: codec bytes or decoded arrays changed"


def test_golden_table_covers_every_case():
    assert sorted(GOLDEN) == sorted(c[0] for c in CASES)


if __name__ == "__main__":
    for c in CASES:
        b, d = blob_and_decoded_sha(c)
        print(f'    "{c[0]}": ("{b[:16]}", "{d[:16]}"),')
