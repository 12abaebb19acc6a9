"""Phase one: run the teacher once over a corpus and write its top-k targets as a sharded, resumable dump.

Never imports :mod:`ddk_offline.distillation`; the two phases meet only in :mod:`ddk_offline.format`.

- :mod:`.config`    :class:`DumpConfig` (every option and its default), stats and result types
- :mod:`.run`       :func:`dump_teacher` / :func:`run_dump`: validate, pre-pass, prepare ``--out``, compute, finish
- :mod:`.loop`      the second pass: batches -> teacher -> shard writer thread
- :mod:`.corpus`    read any local source as documents; :mod:`.packing` tokenise, EOS, pack, train/val split
- :mod:`.teachers`  the teacher backends (protocol + ``hf``)
- :mod:`.outdir`    the dump folder's rules: lock, refusing a different dump, resume bookkeeping
- :mod:`.ranks`     torchrun: shard journal of ranks other than 0, the shared manifest
- :mod:`.verify`    ``dumps verify``; :mod:`.repair` ``dumps verify --repair``
"""

from __future__ import annotations

from ddk_offline.dump.config import DumpConfig, DumpProgress, DumpResult, DumpStats
from ddk_offline.dump.run import dump_teacher, run_dump

__all__ = ["DumpConfig", "DumpProgress", "DumpResult", "DumpStats", "dump_teacher", "run_dump"]
