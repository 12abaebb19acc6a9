"""``--config FILE``: the file's settings, then every option given on the command line on top of them."""

from __future__ import annotations

from typing import Any

import typer

from ddk_offline.errors import UserError


def merged_settings(
    ctx: typer.Context, cls: type, cli: dict[str, Any], config: str | None, required: tuple[str, ...]
) -> dict[str, Any]:
    """Settings for ``cls``: ``config``'s keys, overridden by the options given on the command line.

    Args:
        ctx: the command's context (which options the user typed, as opposed to their defaults).
        cls: the settings dataclass.
        cli: every option's value as parsed (defaults included), by field name.
        config: the ``--config`` path, or None.
        required: fields that must be set by one or the other.
    """
    from ddk_offline.runtime.configfile import read_config_file

    values = read_config_file(config, cls) if config else {}
    for name, value in cli.items():
        # By name: typer may carry its own copy of click, whose ParameterSource is another enum class.
        typed = getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
        if typed or name not in values:
            values[name] = value
    missing = [f"--{n.replace('_', '-')}" for n in required if values.get(n) in (None, "")]
    if missing:
        where = f" or as keys in {config}" if config else " (or as keys in a --config file)"
        raise UserError(f"missing {', '.join(missing)}: give them on the command line{where}")
    return values
