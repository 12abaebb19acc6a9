"""Teacher backends: one class per way of running a teacher, registered by name (``--teacher-backend``).

To add one, write a class with the :class:`~ddk_offline.dump.teachers.base.TeacherBackend` methods in a module here
and add it to :data:`BACKENDS`; the dump, its manifest and ``dumps verify --repair`` pick it up by name.
"""

from __future__ import annotations

from ddk_offline.dump.teachers.base import Targets, TeacherBackend, reduce_logits, tokenizer_identity
from ddk_offline.dump.teachers.hf import HFTeacher
from ddk_offline.errors import UserError

#: backend name -> class; the constructor takes (teacher, gguf_file=, trust_remote_code=) and loads nothing.
BACKENDS: dict[str, type] = {HFTeacher.backend: HFTeacher}

__all__ = ["BACKENDS", "HFTeacher", "TeacherBackend", "Targets", "open_teacher", "reduce_logits", "tokenizer_identity"]


def open_teacher(
    backend: str, teacher: str, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> TeacherBackend:
    """The teacher ``teacher`` behind backend ``backend`` (resolved, not loaded).

    Raises:
        UserError: an unknown backend, or a teacher that cannot be found.
    """
    if backend not in BACKENDS:
        raise UserError(f"--teacher-backend {backend!r}: unknown; choose one of {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend](teacher, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
