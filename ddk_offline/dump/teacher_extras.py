"""The teacher matrices DSKD needs (embedding output, head, bias): written by a dump, or added to one afterwards.

``dump-teacher --store-teacher-matrices`` calls :func:`store_matrices` with the teacher it already loaded;
``ddk-offline dumps add-teacher-matrices DUMP`` (:func:`add_teacher_matrices`) loads the teacher once, refuses one
whose identity differs from the manifest's, and writes the file, then the manifest, each atomically, under the
dump's lock. The matrices are not part of ``Manifest.identity()``: adding them changes no stored target, so a
``distill --resume`` on the dump goes on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ddk_offline.dump.outdir import DumpLock
from ddk_offline.dump.teachers import TeacherBackend, open_teacher, tokenizer_identity
from ddk_offline.errors import UserError
from ddk_offline.format.manifest import Manifest
from ddk_offline.format.storage import Storage, as_storage
from ddk_offline.format.teacher_matrices import DEFAULT_DTYPE, DTYPES, check_teacher_matrices, save_teacher_matrices
from ddk_offline.runtime.device import resolve_device, resolve_dtype


@dataclass
class AddResult:
    """What :func:`add_teacher_matrices` did: ``written`` False when the dump already held matching matrices."""

    manifest: Manifest
    written: bool
    message: str


def store_matrices(teacher: TeacherBackend, manifest: Manifest, out: Storage, dtype: str) -> None:
    """Write the loaded ``teacher``'s matrices into the dump ``out`` and record them in its manifest (under the lock).

    The file is renamed into place before the manifest that lists it is written: a crash in between leaves an
    unlisted file, replaced by the next call.
    """
    manifest.teacher_matrices = save_teacher_matrices(out, teacher.matrices(), dtype)
    manifest.write_atomic(out)


def matrices_present(manifest: Manifest, out: Storage, dtype: str) -> bool:
    """Whether the dump already lists matrices in ``dtype`` whose file matches the manifest."""
    rec = manifest.teacher_matrices
    return rec is not None and rec.get("dtype") == dtype and check_teacher_matrices(out, manifest) is None


def identity_differences(teacher: TeacherBackend, manifest: Manifest) -> list[str]:
    """``"field: dump vs given"`` for every identity field of ``teacher`` that differs from the dump's manifest."""
    have = {f"teacher.{k}": manifest.teacher.get(k) for k in ("config_sha256", "weights_sha256")}
    have |= {f"tokenizer.{k}": v for k, v in manifest.tokenizer.items() if k != "class"}
    ident = teacher.identity()
    given = {f"teacher.{k}": ident.get(k) for k in ("config_sha256", "weights_sha256")}
    given |= {f"tokenizer.{k}": v for k, v in tokenizer_identity(teacher.tokenizer(), teacher.vocab_size()).items()}
    return [
        f"{key}: {have[key]!r} in the dump vs {given.get(key)!r} given" for key in have if have[key] != given.get(key)
    ]


def add_teacher_matrices(
    dump: str | os.PathLike | Storage,
    *,
    teacher: str | None = None,
    gguf_file: str | None = None,
    teacher_backend: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = DEFAULT_DTYPE,
    device: str = "cpu",
    load_dtype: str = "float32",
    backend: TeacherBackend | None = None,
) -> AddResult:
    """Add ``teacher_matrices.safetensors`` to an existing dump (``ddk-offline dumps add-teacher-matrices``).

    Args:
        dump: the dump directory (or fsspec URL; the lock applies to local folders).
        teacher, gguf_file: the teacher (default: the manifest's, where it is on this machine).
        teacher_backend: its backend (default: the manifest's).
        trust_remote_code: allow the teacher's own modelling code.
        dtype: the stored dtype (``bfloat16``, ``float16``, ``float32``).
        device, load_dtype: where and in which dtype the teacher is loaded (float32 on the CPU by default: the
            matrices are weights, no forward runs).
        backend: a teacher backend handed in (tests), instead of opening one.

    Returns:
        :class:`AddResult`; ``written`` is False when matching matrices were already there (nothing is loaded).

    Raises:
        UserError: the teacher is not given and not on this machine, or its identity differs from the dump's.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    store = as_storage(dump)
    with DumpLock(store):
        manifest = Manifest.load(store)  # under the lock: no dump-teacher is writing it now
        if matrices_present(manifest, store, dtype):
            message = f"{store.url}: already holds matching teacher matrices ({dtype}); nothing to do"
            return AddResult(manifest, False, message)
        if backend is None:
            name = teacher or manifest.local_teacher()
            if name is None:
                raise UserError(
                    f"{store.where('manifest.json')}: the dump's teacher {manifest.teacher_name!r} is not on this "
                    "machine; pass --teacher PATH (it must be the same weights: the hashes are checked)"
                )
            backend = open_teacher(
                teacher_backend or manifest.teacher.get("backend", "hf"),
                name,
                gguf_file=gguf_file if teacher else None,
                trust_remote_code=trust_remote_code,
            )
        diffs = identity_differences(backend, manifest)
        if diffs:
            raise UserError(
                f"--teacher {backend.name}: not the teacher the dump {store.url} was made with ({'; '.join(diffs)}); "
                f"the dump's teacher is {manifest.teacher_name!r}. Pass that teacher's weights as --teacher. "
                "Nothing was changed"
            )
        dev = resolve_device(device)
        backend.load(device=dev, dtype=resolve_dtype(load_dtype, dev))
        store_matrices(backend, manifest, store, dtype)
        rec = manifest.teacher_matrices
        return AddResult(
            manifest,
            True,
            f"{store.where(rec['file'])}: wrote head {rec['head_shape']} and embed {rec['embed_shape']} in {dtype} "
            f"({rec['bytes'] / 1e6:.1f} MB, tied {rec['tied']}); the manifest lists it",
        )
