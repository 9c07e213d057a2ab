"""What a finished IPython cell says about itself: its error and its title.

The magics (``%%chat``, auto-notify) and the Run All summary read a cell the
same way, so both import it from here, below them both: neither imports the
other.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cell_error", "cell_title"]


def cell_error(result: Any) -> BaseException | None:
    """The exception a cell ended with (IPython's ``ExecutionResult``), or None.

    An error before execution (a syntax error, a failing input transformer or
    magic) comes first: the cell's code never ran.
    """
    before = getattr(result, "error_before_exec", None)
    return before if before is not None else getattr(result, "error_in_exec", None)


def cell_title(source: str) -> str:
    """The cell's first ``#`` comment line, or ``""``."""
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            text = s.lstrip("#").strip()
            if text and not text.startswith("-*-"):
                return text[:120]
    return ""
