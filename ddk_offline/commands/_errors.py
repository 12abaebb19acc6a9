"""Shared CLI error handling: user errors become one red line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ddk_offline.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status for bad input (typer/click use 2 for usage errors too).
USER_ERROR_EXIT = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user (imported lazily: the format layer pulls in pyarrow)."""
    from ddk_offline.format.manifest import ManifestError
    from ddk_offline.format.reader import ShardError

    return (UserError, ManifestError, ShardError)


def fail(message: str) -> typer.Exit:
    """Print ``message`` as one red line on stderr; ``raise fail(...)`` exits with status 2."""
    typer.secho(f"error: {' '.join(str(message).split())}", fg=typer.colors.RED, err=True)
    return typer.Exit(USER_ERROR_EXIT)


def exit_on_user_error(fn: F) -> F:
    """Decorate a command so user errors exit with one red line and status 2 (other errors keep their traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except user_error_types() as e:
            raise fail(str(e)) from None

    return wrapper  # type: ignore[return-value]
