"""ddk-offline: offline, domain-aware knowledge distillation (DDK) from precomputed teacher logits.

Public API (stable names), in the order data flows:

- :class:`DumpConfig`, :func:`dump_teacher` - phase one: run the teacher once, write a dump.
- :func:`open_dump` - read a teacher dump (manifest, per-domain sequences, random access).
- :func:`make_sampler` - the domain samplers (ddk, uniform, proportional, fixed).
- :func:`fused_kd_loss` - the CE + KL loss over full student logits and sparse top-k teacher
  targets (re-exported from the ``ddk_kernels`` package); :func:`fused_linear_kd_loss` - the same loss from
  hidden states and the output head, without the [N, V] logits.
- :class:`DistillConfig`, :func:`distill` - phase two: train a student from a dump.
- :func:`evaluate` - per-domain validation loss of models next to the teacher's stored loss.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it. Lazy re-exports keep `import ddk_offline` (and so the CLI's --help) fast:
# torch, transformers and pyarrow are only imported when the API that needs them is touched.
_EXPORTS: dict[str, str] = {
    "DumpConfig": "ddk_offline.dump.config",
    "dump_teacher": "ddk_offline.dump.run",
    "open_dump": "ddk_offline.format.reader",
    "make_sampler": "ddk_offline.distillation.samplers",
    "fused_kd_loss": "ddk_kernels",
    "fused_linear_kd_loss": "ddk_kernels",
    "DistillConfig": "ddk_offline.distillation.config",
    "distill": "ddk_offline.distillation.trainer",
    "evaluate": "ddk_offline.distillation.evaluation",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ddk_offline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
