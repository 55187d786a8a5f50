"""The one rule for a file a command reads from outside (a window file, a status or calibration file, a
checkpoint's metadata.json): it must be a regular file, checked before it is opened, and text it holds is
decoded and parsed with every failure one UserError line.

Why before opening: open() on a FIFO blocks until a writer comes, so `--status some-fifo` hung forever; a
directory raised IsADirectoryError from deep inside a reader. Why RecursionError is caught: `json.loads` and
`yaml.safe_load` recurse once per nesting level, and a file nested 20,000 deep ends in RecursionError,
which is no ValueError.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from grail_pipeline.common.errors import UserError


def not_a_regular_file(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be read as a file, as the end of a sentence that starts with its name; None: it can."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a pipe, socket or device): give the file itself"
    return None


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of `path`; `what` names it in the one line a failure gives ("status file")."""
    problem = not_a_regular_file(path)
    if problem is not None:
        raise UserError(f"{what} {path} {problem}")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None


def parse_json(text: str | bytes, what: str) -> Any:
    """`json.loads(text)`, where text that is not JSON or is nested too deep is one UserError naming `what`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{what} is nested too deep to read") from None
    except ValueError as exc:  # JSONDecodeError, and bytes that are not UTF-8
        raise UserError(f"{what} is not JSON ({str(exc)[:80]})") from None
