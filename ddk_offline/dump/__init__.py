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

from typing import Any

from ddk_offline.dump.config import DumpConfig, DumpProgress, DumpResult, DumpStats

__all__ = ["DumpConfig", "DumpProgress", "DumpResult", "DumpStats", "dump_teacher", "run_dump"]


def __getattr__(name: str) -> Any:
    # Lazy: `dump_teacher` and `run_dump` pull in torch and transformers, which `dumps verify` and `dumps info`
    # (importing this package for ddk_offline.dump.verify) never need.
    if name in ("dump_teacher", "run_dump"):
        from ddk_offline.dump import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
