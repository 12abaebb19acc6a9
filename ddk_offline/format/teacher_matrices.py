"""The teacher's embedding output, output head and bias, stored beside the shards for DSKD (phase two).

Phase two never runs the teacher, so what DSKD takes from it besides the stored top-k comes from the dump:

- ``embed`` [V_in, D]: what the teacher's input-embedding *module* returns for every id (an embedding scale, such
  as Gemma's sqrt(D), is included);
- ``head`` [V, D]: the output projection the logits come from (``logits = hidden @ head.T + head_bias``), and
  ``head_bias`` [V] when the teacher has one;
- ``tied``: the head and the embedding share one tensor in the teacher; ``softcap``: the teacher's final-logit
  soft-cap (``logits = softcap * tanh(logits / softcap)``), None when it has none.

The file is ``teacher_matrices.safetensors`` (tensors ``head``, optionally ``embed`` and ``head_bias``), written by
``dump-teacher --store-teacher-matrices`` or ``ddk-offline dumps add-teacher-matrices``, listed in
``manifest.teacher_matrices`` with its sha256. When the embedding output equals the head times a scalar (a tied
teacher: 1, or Gemma's sqrt(D)), ``embed`` is not stored and the loader rebuilds it as ``head * embed_scale``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from typing import Any

from ddk_offline.errors import UserError
from ddk_offline.format.manifest import Manifest
from ddk_offline.format.schema import TEACHER_MATRICES_NAME
from ddk_offline.format.storage import Storage, as_storage
from ddk_offline.runtime.files import hash_stream, sha256_file

#: The dtype ``--store-teacher-matrices`` writes by default. float16 is half of float32's size, like bfloat16, but
#: keeps 11 significant bits instead of 8: it holds every bfloat16 weight in its normal range exactly (most teachers
#: ship as bfloat16) and is ~7x more precise on float32 or dequantised GGUF weights (benchmarks/results/dskd_extras.md:
#: SmolLM2's rows, mean relative error 2.1e-4 vs 1.4e-3). A matrix beyond float16's range is refused with the fix.
DEFAULT_DTYPE = "float16"
DTYPES = ("bfloat16", "float16", "float32")
_MAGIC = "ddk-offline-teacher-matrices"


class TeacherMatricesError(UserError):
    """The dump has no teacher matrices, or its file does not match the manifest; the message names the fix."""


@dataclass
class TeacherMatrices:
    """What DSKD reads from the teacher (torch tensors, CPU).

    Attributes:
        embed: [V_in, D] the embedding module's output for ids 0..V_in-1 (any embedding scale included).
        head: [V, D] the output projection (logits = hidden @ head.T + head_bias).
        head_bias: [V] or None.
        tied: whether the teacher's head and input embedding are one tensor.
        softcap: the final-logit soft-cap of the teacher's config (e.g. Gemma-2's 30.0), None when it has none.
        dtype: ``bfloat16``, ``float16`` or ``float32`` (the stored dtype; the tensors come back in it).
        embed_scale: a hint from the backend, when it knows one (the embedding module's own scale): the writer stores
            ``embed`` as ``head * embed_scale`` instead of a second matrix when that reproduces it.
    """

    embed: Any
    head: Any
    head_bias: Any = None
    tied: bool = False
    softcap: float | None = None
    dtype: str = DEFAULT_DTYPE
    embed_scale: float | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.head.shape[1])


def save_teacher_matrices(store: str | os.PathLike | Storage, matrices: TeacherMatrices, dtype: str) -> dict:
    """Write ``teacher_matrices.safetensors`` into a dump atomically; returns its ``manifest.teacher_matrices`` record.

    The caller (holding the dump's lock) then writes the manifest with the record: a crash between the two leaves a
    file no manifest lists, which the next call replaces.
    """
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise UserError(f"--matrices-dtype {dtype}: choose one of {', '.join(DTYPES)}")
    store = as_storage(store)
    dt = getattr(torch, dtype)
    head = matrices.head.detach().to("cpu", dt).contiguous()
    embed = matrices.embed.detach().to("cpu", torch.float32)
    scale = _shared_scale(embed, head, matrices)
    tensors = {"head": head}
    if dtype == "float16" and not (torch.isfinite(head).all() and embed.abs().max() <= torch.finfo(dt).max):
        raise UserError(
            "the teacher's head or embedding output exceeds float16's range (65504); "
            "store the matrices with --matrices-dtype bfloat16 (or float32)"
        )
    if scale is None:
        tensors["embed"] = embed.to(dt).contiguous()
    if matrices.head_bias is not None:
        tensors["head_bias"] = matrices.head_bias.detach().to("cpu", dt).contiguous()
    scratch = store.scratch()
    tmp = scratch / f"{TEACHER_MATRICES_NAME}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": _MAGIC})
        digest, size = sha256_file(tmp, fsync=True)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: no partial file left
        raise
    store.commit(tmp, TEACHER_MATRICES_NAME)
    if store.local is None:
        shutil.rmtree(scratch, ignore_errors=True)  # the local staging folder of a remote dump
    return {
        "file": TEACHER_MATRICES_NAME,
        "bytes": size,
        "sha256": digest,
        "dtype": dtype,
        "embed_shape": list(embed.shape),
        "head_shape": list(head.shape),
        "head_bias": matrices.head_bias is not None,
        "tied": bool(matrices.tied),
        "embed_scale": scale,
        "softcap": None if matrices.softcap is None else float(matrices.softcap),
    }


def _shared_scale(embed, head, matrices: TeacherMatrices) -> float | None:
    """The scalar s with embed == head * s to the stored precision (tied teachers), or None: store both."""
    import torch

    if not matrices.tied or embed.shape != head.shape:
        return None
    tol = torch.finfo(head.dtype).eps  # the rounding that storing ``embed`` in this dtype would cause anyway
    for s in dict.fromkeys([1.0, matrices.embed_scale or 1.0]):
        rebuilt = head.float() * s
        if ((rebuilt - embed).abs() <= tol * embed.abs() + 1e-30).all():
            return float(s)
    return None


def load_teacher_matrices(
    dump: str | os.PathLike | Storage, manifest: Manifest | None = None, *, verify: bool = True
) -> TeacherMatrices:
    """The teacher matrices of a dump (for DSKD), checked against the manifest's sha256.

    Args:
        dump: the dump directory or fsspec URL.
        manifest: its manifest (loaded from ``dump`` when None).
        verify: hash the file against ``manifest.teacher_matrices.sha256`` (one sequential read).

    Returns:
        :class:`TeacherMatrices` with ``embed`` [V_in, D], ``head`` [V, D], ``head_bias`` [V] or None, in the stored
        dtype.

    Raises:
        TeacherMatricesError: the dump has none (run ``ddk-offline dumps add-teacher-matrices DUMP``), or the file
            is missing or differs from the manifest.
    """
    from safetensors.torch import load

    store = as_storage(dump)
    manifest = manifest or Manifest.load(store)
    rec = manifest.teacher_matrices
    if rec is None:
        raise TeacherMatricesError(
            f"{store.where('manifest.json')}: the dump holds no teacher matrices (field 'teacher_matrices' is absent), "
            f"which DSKD needs. Add them with `ddk-offline dumps add-teacher-matrices {store.url}` (loads the "
            "teacher once), or dump with --store-teacher-matrices"
        )
    problem = check_teacher_matrices(store, manifest) if verify else None
    if problem is not None:
        raise TeacherMatricesError(f"{store.where(rec['file'])}: {problem}")
    tensors = load(store.read_bytes(rec["file"]))
    head = tensors["head"]
    embed = tensors.get("embed")
    if embed is None:
        embed = (head.float() * rec["embed_scale"]).to(head.dtype)
    dtype = str(head.dtype).removeprefix("torch.")
    if dtype != rec["dtype"] or list(head.shape) != rec["head_shape"] or list(embed.shape) != rec["embed_shape"]:
        raise TeacherMatricesError(
            f"{store.where(rec['file'])}: holds {dtype} head {list(head.shape)} / embed {list(embed.shape)}, the "
            f"manifest says {rec['dtype']} {rec['head_shape']} / {rec['embed_shape']}; rerun `ddk-offline dumps "
            f"add-teacher-matrices {store.url}`"
        )
    return TeacherMatrices(
        embed=embed,
        head=head,
        head_bias=tensors.get("head_bias"),
        tied=bool(rec["tied"]),
        softcap=rec.get("softcap"),
        dtype=dtype,
        embed_scale=rec.get("embed_scale"),
    )


def check_teacher_matrices(store: str | os.PathLike | Storage, manifest: Manifest) -> str | None:
    """Why the listed matrices file is unusable (missing, size or sha256 differs), or None when it matches."""
    store = as_storage(store)
    rec = manifest.teacher_matrices
    if rec is None:
        return None
    fix = f"rerun `ddk-offline dumps add-teacher-matrices {store.url}` to write it again"
    if not store.isfile(rec["file"]):
        return f"missing (listed in the manifest's teacher_matrices); {fix}"
    h = hashlib.sha256()
    src = store.open_input(rec["file"])
    with open(src, "rb") if isinstance(src, str) else src as f:
        size = hash_stream(h, f)
    if size != rec.get("bytes") or h.hexdigest() != rec["sha256"]:
        return f"size or sha256 differs from the manifest's teacher_matrices (corrupted or replaced); {fix}"
    return None
