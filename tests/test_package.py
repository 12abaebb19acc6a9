"""Packaging: the CLI starts, and the kernels folder cannot shadow the PyPI `kernels` package."""

from __future__ import annotations

import importlib.util


def test_cli_version(cli):
    out = cli("version").stdout
    assert out.startswith("ddk-offline ")
    assert "torch " in out


def test_cli_help_lists_commands(cli):
    out = cli("--help").stdout
    assert "version" in out


def test_kernels_folder_does_not_register_as_hub_kernels_package():
    # `kernels/` has no __init__.py: even with the repo root on sys.path it is at most a PEP 420
    # namespace portion, which transformers' probe rejects, and which any real `kernels` install outranks.
    from transformers.utils import import_utils

    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is None:  # only our namespace portion is visible
        assert import_utils.is_kernels_available() is False
    assert importlib.util.find_spec("ddk_kernels") is not None


def test_public_api_names_resolve():
    import ddk_offline
    import ddk_offline.distillation.evaluation  # noqa: F401  (a submodule import must not shadow an exported name)

    for name in ddk_offline.__all__[1:]:
        assert callable(getattr(ddk_offline, name)), name
    from ddk_kernels import fused_kd_loss

    assert ddk_offline.fused_kd_loss is fused_kd_loss


def test_model_loads_are_quiet_and_put_the_bars_back(capfd, teacher_dir):
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    import transformers.utils.logging as hf_logging

    from ddk_offline.distillation.student import load_student
    from ddk_offline.runtime.quiet import quiet_loading

    real = gguf_utils.tqdm
    with quiet_loading():
        assert isinstance(gguf_utils.tqdm, functools.partial) and gguf_utils.tqdm.keywords == {"disable": True}
        assert not hf_logging.is_progress_bar_enabled()
    assert gguf_utils.tqdm is real and hf_logging.is_progress_bar_enabled()  # as the caller had them
    capfd.readouterr()
    load_student(pretrained=str(teacher_dir))  # the Python API, no CLI: no "Loading weights" bar
    assert "Loading weights" not in capfd.readouterr().err
