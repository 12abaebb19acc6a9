"""CLI command modules; each exposes ``register(app: typer.Typer) -> None``."""

from __future__ import annotations

import importlib
from types import ModuleType

# One line per command module; keep the order of the README's CLI reference.
_NAMES: list[str] = [
    "ddk_offline.commands.dump",
    "ddk_offline.commands.dumps",
    "ddk_offline.commands.distill",
    "ddk_offline.commands.eval",
    "ddk_offline.commands.runs",
    "ddk_offline.commands.bench",
    "ddk_offline.commands.version",
]

COMMAND_MODULES: list[ModuleType] = [importlib.import_module(n) for n in _NAMES]
