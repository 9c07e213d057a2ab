"""The one-line message on stderr: the one way chat_magic talks to a user outside an exception.

Every front end (the magics, ``notify_when_done``, ``chat-magic run``, the
``chat-magic`` command, the delivery worker's exit summary) says what went
wrong in one line, prefixed with who is talking, redacted, flushed, and
never raising: these lines are written from ``__exit__`` blocks, daemon
threads and interpreter shutdown, where an exception would hide the user's
own result.
"""

from __future__ import annotations

import sys

__all__ = ["PREFIX", "say"]

PREFIX = "chat_magic"


def say(message: object, *, prefix: str = PREFIX) -> None:
    """Write ``prefix: message`` on stderr as one redacted line; never raises."""
    try:
        from .webhook import redact

        line = " ".join(redact(message).split())
        print(f"{prefix}: {line}", file=sys.stderr, flush=True)
    except Exception:
        pass
