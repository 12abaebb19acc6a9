"""Run settings from a YAML (or JSON) file: ``--config FILE`` for ``dump-teacher`` and ``distill``.

A key is an option's name, with dashes or underscores (``seq-len`` or ``seq_len``). What a run saves
(``OUT/config.json`` of a distill run, ``DUMP/dump_config.json``) is a valid file, so any run can be repeated or
varied from it. Unknown keys and values of the wrong type are refused with the file, the key and the fix; nothing is
silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

from ddk_offline.errors import UserError


def read_config_file(path: str | Path, cls: type, *, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The settings in ``path`` for the dataclass ``cls``, as ``{field name: checked value}``.

    Args:
        path: a YAML or JSON file holding one mapping (a dump's ``dump_config.json`` is read from its ``config``).
        cls: the settings dataclass (``DumpConfig``, ``DistillConfig``).
        skip: fields a file may not set (e.g. run-control flags); they are refused like unknown keys.

    Raises:
        UserError: the file cannot be read or parsed, is not a mapping, or holds an unknown key or a wrong type.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e}); check the path") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML/JSON ({str(e).splitlines()[0]}); fix the syntax") from None
    if isinstance(data, dict) and set(data) == {"config", "last_run"}:  # DUMP/dump_config.json
        data = data["config"]
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: must hold one mapping of option: value, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"did you mean '{close[0].replace('_', '-')}'? " if close else ""
            raise UserError(
                f"--config {path}: unknown key '{key}'; {hint}the keys are the command's options "
                f"({', '.join(sorted(n.replace('_', '-') for n in names))})"
            )
        out[name] = _checked(path, str(key), value, hints[name])
    return out


def _checked(path: Path, key: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits the annotation ``hint`` (ints for floats and comma strings for tuples converted)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:  # tuple[float, ...]: a list, or "2.0,4.0" as the CLI spells it
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        try:
            return tuple(_checked(path, key, float(v) if isinstance(v, str) else v, args[0]) for v in items)
        except (TypeError, ValueError):
            raise UserError(
                f"--config {path}: '{key}' must be a list of numbers (or '2.0,4.0'), got {value!r}"
            ) from None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if not ok:
        want = getattr(hint, "__name__", str(hint))
        raise UserError(
            f"--config {path}: '{key}' must be {want}, got {json.dumps(value)} ({type(value).__name__}); fix the value"
        )
    return float(value) if hint is float else value
