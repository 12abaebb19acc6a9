"""The user-error base class: bad input that the user can fix, reported without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or output location.

    The message is complete on its own: it names the file (or option), the field and the fix. The CLI
    prints it as one red line and exits with status 2 (see ``ddk_offline/commands/_errors.py``).
    """
