"""ddk-offline: offline, domain-aware knowledge distillation (DDK) from precomputed teacher logits.

Public API (stable names):

- :func:`open_dump` - read a teacher dump written by ``ddk-offline dump-teacher``.
- :func:`fused_kd_loss` - the CE + KL loss over full student logits and sparse top-k teacher
  targets (re-exported from the ``ddk_kernels`` package).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "open_dump", "fused_kd_loss"]


def __getattr__(name: str) -> Any:
    # Lazy re-exports keep `import ddk_offline` (and so the CLI's --help) fast: torch and
    # pyarrow are only imported when the API that needs them is touched.
    if name == "open_dump":
        from ddk_offline.format.reader import open_dump

        return open_dump
    if name == "fused_kd_loss":
        from ddk_kernels import fused_kd_loss

        return fused_kd_loss
    raise AttributeError(f"module 'ddk_offline' has no attribute {name!r}")
