"""Errors a user can act on: `avrec` prints them as one line (what, where, the likely cause, the fix) and
exits non-zero, without a traceback. Each module raises its own subclass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A problem with the user's input, settings or run directory, stated in one line."""


class RunFileError(UserError, ValueError):
    """A file of a run directory is missing or unreadable."""


def read_json(path: Path) -> Any:
    """A run's JSON file, or a RunFileError naming it and the likely cause."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing; likely cause: the run did not finish (or this is not a run "
                           "directory)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFileError(f"{path}: not valid JSON ({exc}); likely cause: truncated by an interrupted write or "
                           "edited by hand; rerun the command that writes it") from None
