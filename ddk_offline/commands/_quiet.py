"""Silence the libraries' own console output in CLI commands that draw their own progress and tables."""

from __future__ import annotations


def quiet_libraries() -> None:
    """transformers' per-file progress bars and warnings would interleave with our progress bars and tables."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    _quiet_gguf_loading()


def _quiet_gguf_loading() -> None:
    """transformers converts GGUF weights under a plain tqdm bar (not its own switchable one): turn that one off."""
    import functools

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except Exception:  # an older or newer transformers without that module: nothing to silence
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_utils.tqdm = functools.partial(bar, disable=True)
