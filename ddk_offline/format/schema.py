"""Format version and the Parquet schema of a shard row (one packed sequence). See docs/FORMAT.md."""

from __future__ import annotations

import pyarrow as pa

#: Bump on any change to the row layout, the manifest's meaning or the codec's byte layout, and record
#: the bump in CHANGELOG.md: dumps outlive the code that wrote them.
FORMAT_VERSION = 2  # 2: the top-k codec's layout 2 (decoding a row's topk needs its input_ids)
#: Version 3 = version 2 + BOS packing: rows hold the teacher's BOS token (at each document and row start) and the
#: positions that predict it carry no target (``teacher_nll`` NaN, masked in phase two by ``manifest.bos_token_id``).
#: Only dumps that use a BOS are written as version 3, so dumps without one keep version 2's bytes, and an older
#: ddk-offline refuses a BOS dump instead of training on targets it would not mask.
BOS_FORMAT_VERSION = 3
FORMAT_NAME = "ddk-offline-teacher-dump"
SUPPORTED_VERSIONS = (1, 2, 3)  # version-1 dumps hold layout-1 topk blobs, which every reader still decodes

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
LOCK_NAME = ".lock"
TMP_DIR = ".tmp"
#: The teacher's embedding-module output for every id, its output head and bias (``--store-teacher-matrices``,
#: ``dumps add-teacher-matrices``; DSKD in phase two), listed in ``manifest.teacher_matrices``.
TEACHER_MATRICES_NAME = "teacher_matrices.safetensors"

SPLITS = ("train", "val")

# Column names of a shard (stored) and keys of a decoded row (what the reader returns): the only spelling of them.
SEQ_INDEX = "seq_index"
INPUT_IDS = "input_ids"
TOPK_BLOB = "topk"
TEACHER_LSE = "teacher_lse"
TEACHER_NLL = "teacher_nll"
TOPK_IDS = "topk_ids"  # decoded from the blob
TOPK_LOGITS = "topk_logits"  # decoded from the blob
#: Optional column (``--store-hidden-states``): the teacher's last hidden state, one blob per row (format/hidden_codec);
#: the reader returns it decoded under the same key, float32 [L, D], only when asked for.
TEACHER_HIDDEN = "teacher_hidden"

#: Rows per Parquet row group: small enough for cheap random access by the trainer.
ROW_GROUP_ROWS = 32


def lse_column(temperature: float) -> str:
    """Column holding the teacher's full-row logsumexp of logits / T for an extra temperature T != 1."""
    return f"teacher_lse_t{temperature:g}".replace(".", "p")


def shard_schema(
    extra_temperatures: tuple[float, ...] = (), version: int = FORMAT_VERSION, *, hidden: bool = False
) -> pa.Schema:
    """The Arrow schema of one shard (``version``: the dump's format version, stored in the metadata).

    One row = one packed sequence of L tokens.

    Columns:
        seq_index: int64, the sequence's index within its (domain, split) stream.
        input_ids: list<int32> [L], token ids.
        topk: binary, the codec blob for the sequence's top-k ids and logits [L, k].
        teacher_lse: list<float32> [L], logsumexp of the teacher's full logit row (T = 1).
        teacher_nll: list<float32> [L], teacher loss on input_ids[n + 1]; NaN at n = L - 1 (and, in a BOS dump,
            where input_ids[n + 1] is the BOS).
        teacher_lse_t<T>: list<float32> [L], one per extra temperature (logsumexp of logits / T).
        teacher_hidden: binary, only with ``hidden``: the teacher's last hidden state [L, D], encoded as
            ``manifest.settings.hidden_states`` says.
    """
    fields = [
        pa.field(SEQ_INDEX, pa.int64(), nullable=False),
        pa.field(INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(TOPK_BLOB, pa.binary(), nullable=False),
        pa.field(TEACHER_LSE, pa.list_(pa.float32()), nullable=False),
        pa.field(TEACHER_NLL, pa.list_(pa.float32()), nullable=False),
    ]
    fields += [pa.field(lse_column(t), pa.list_(pa.float32()), nullable=False) for t in extra_temperatures]
    if hidden:
        fields.append(pa.field(TEACHER_HIDDEN, pa.binary(), nullable=False))
    return pa.schema(fields, metadata={b"ddk_format": FORMAT_NAME.encode(), b"ddk_version": str(version).encode()})


def float_columns(extra_temperatures: tuple[float, ...] = ()) -> list[str]:
    """Columns written with BYTE_STREAM_SPLIT: fp32 byte planes compress far better under zstd."""
    return [TEACHER_LSE, TEACHER_NLL] + [lse_column(t) for t in extra_temperatures]
