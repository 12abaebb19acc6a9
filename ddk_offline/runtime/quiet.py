"""transformers' own progress bars (weight loading, GGUF conversion) switched off while ddk-offline loads a model.

A ddk-offline command draws its own progress; a Python caller gets the same quiet loads. The switch is put back
as it was afterwards, so a caller's other transformers work keeps its bars.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Inside the block: no transformers progress bars, and no bar from its GGUF conversion (a plain tqdm)."""
    import transformers.utils.logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils, bar = _gguf_bar()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def _gguf_bar():
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except Exception:  # a transformers without that module: nothing to silence
        return None, None
    bar = getattr(gguf_utils, "tqdm", None)
    return (gguf_utils, bar) if bar is not None and not isinstance(bar, functools.partial) else (None, None)
