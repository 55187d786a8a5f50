"""The one exception type for mistakes a user can fix (bad flags, missing files, broken wallets), and
the one walker that finds an exception inside the exception groups anyio's task groups raise.

The command line turns a UserError into one clear line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line."""


def find_in_group(exc: BaseException, kind: type[E]) -> E | None:
    """`exc` itself if it is a `kind`, else the first `kind` nested in its exception groups (depth first)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_in_group(inner, kind)
            if found is not None:
                return found
    return None
