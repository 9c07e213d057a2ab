"""The rules for what a user gives chat_magic, each in one place.

Every front end (``%%chat`` and the other magics, ``notify_when_done``,
``chat-magic run`` and ``send``, the training callbacks) checks its input with
these functions and only translates the :class:`~chat_magic.errors.ConfigError`
they raise into its own form: a ``UsageError`` in a magic, exit status 2 on
the command line, the exception itself in Python.

- A mention is ``all`` (everyone in the space), a numeric user id
  (``users/123456789`` in the Chat API), or the e-mail address Google Chat
  accepts for a user (``users/alice@example.com``). Anything else would post
  a broken ``<users/...>`` tag that pings nobody.
- A thread key is 1 to 4,000 characters (Google Chat's limit).
"""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = ["MENTION_HELP", "mention_tag", "validate_mention", "validate_on", "validate_thread_key"]

MAX_THREAD_KEY = 4000

# what every front end's help says a mention may be (the rule below accepts exactly these)
MENTION_HELP = "'all' (everyone in the space), a numeric user id, or a user's e-mail address"

_MENTION = re.compile(r"(?:users/)?(all|\d{1,64}|[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63})")


def validate_mention(who: object, *, option: str = "mention") -> str | None:
    """The user part of a mention (``all``, ``123456789`` or ``alice@example.com``), or None for no mention.

    ``option`` names the setting in the error (``--mention``, ``mention=``).
    """
    if who is None:
        return None
    text = str(who).strip()
    m = _MENTION.fullmatch(text)
    if not m:
        raise ConfigError(
            f"{option} {text!r} is not someone Google Chat can mention: use 'all', a numeric user id "
            "such as 123456789012345678901, or a user's e-mail address"
        )
    return m.group(1)


def mention_tag(who: str | None) -> str:
    """``<users/WHO>``: the only way a mention gets into a message (``who`` already validated)."""
    return f"<users/{who}>" if who else ""


def validate_thread_key(key: object, *, option: str = "thread key") -> str | None:
    """A thread key stripped of surrounding blanks, or None when not given.

    Raises :class:`ConfigError` for an empty key or one over 4,000 characters.
    """
    if key is None:
        return None
    if not isinstance(key, str):
        raise ConfigError(f"{option} must be a string, not {type(key).__name__}")
    text = key.strip()
    if not text or len(text) > MAX_THREAD_KEY:
        raise ConfigError(f"{option} is 1 to {MAX_THREAD_KEY:,} characters (Google Chat's limit), not {len(text):,}")
    return text


def validate_on(on: object, choices: tuple[str, ...], *, option: str = "on") -> str:
    """One of ``choices`` (e.g. ``("always", "error")``), else a one-line ConfigError."""
    if on not in choices:
        raise ConfigError(f"{option}={on!r}: use {' or '.join(repr(c) for c in choices)}")
    return str(on)
