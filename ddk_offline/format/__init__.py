"""The teacher-dump format: the only code phase one (dump) and phase two (distill) share.

- :mod:`.schema`   - format version, Parquet schema, column names
- :mod:`.codec`    - the compressed top-k encoding (ids + logits) of one sequence
- :mod:`.hidden_codec` - the teacher's last hidden states, one blob per row (``--store-hidden-states``)
- :mod:`.manifest` - the manifest dataclasses, validation, atomic JSON writes
- :mod:`.teacher_matrices` - the teacher's embedding output, head and bias for DSKD (:func:`load_teacher_matrices`)
- :mod:`.writer`   - the background shard writer (bounded queue, temp name + rename)
- :mod:`.reader`   - :func:`open_dump` and the :class:`DumpReader`
"""

from __future__ import annotations

_LAZY = {
    "load_teacher_matrices": "ddk_offline.format.teacher_matrices",
    "TeacherMatrices": "ddk_offline.format.teacher_matrices",
    "TeacherMatricesError": "ddk_offline.format.teacher_matrices",
}


def __getattr__(name: str):
    # Lazy, so importing one format module never drags in the others.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddk_offline.format' has no attribute {name!r}")
