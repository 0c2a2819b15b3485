"""User errors: one line on stderr, exit code 2, never a traceback."""
from __future__ import annotations

import sys

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix (bad argument, unknown experiment, ...). The message is one line."""


class NotFound(UserError):
    pass


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, UserError):
        return True
    spec_load = sys.modules.get("dlmctl.spec.load")  # never imported just to check: --help stays light
    return spec_load is not None and isinstance(err, spec_load.SpecError)


def one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"
