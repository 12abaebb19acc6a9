"""The teacher-dump format: the only code phase one (dump) and phase two (distill) share.

- :mod:`.schema`   - format version, Parquet schema, column names
- :mod:`.codec`    - the compressed top-k encoding (ids + logits) of one sequence
- :mod:`.manifest` - the manifest dataclasses, validation, atomic JSON writes
- :mod:`.writer`   - the background shard writer (bounded queue, temp name + rename)
- :mod:`.reader`   - :func:`open_dump` and the :class:`DumpReader`
"""
