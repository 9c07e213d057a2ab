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
- A duration is seconds (``90``, ``2.5``) or a number with ``s``, ``m`` or
  ``h`` (``90s``, ``5m``, ``2h``), within bounds each setting states. The
  same grammar serves the environment variables (``CHAT_MAGIC_EXIT_TIMEOUT``,
  ``CHAT_MAGIC_IMAGE_PATIENCE``, ``CHAT_MAGIC_REDIS_SLOW``,
  ``CHAT_MAGIC_HEARTBEAT``) and the options a user types (``--stall-after``,
  ``stall_after=``, ``--timeout``, ``--lost-after``): a bad variable is one
  line and its default (a variable is read deep inside delivery, where
  raising would lose a message), a bad option a ConfigError.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable

from .errors import ConfigError

__all__ = ["DURATION_FORMS", "MENTION_HELP", "env_seconds", "mention_tag", "seconds", "seconds_arg", "validate_mention",
           "validate_on", "validate_thread_key"]

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


# what every message about a bad duration says a duration may be (the rule below accepts exactly these)
DURATION_FORMS = "seconds (90 or 2.5) or a number with s, m or h (90s, 5m, 2h)"
DAY = 24 * 3600.0
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_said: set[str] = set()  # bad environment values already told in this process (each is told once)


def _short(value: float) -> str:
    """``90s``, ``5m``, ``24h``: a bound or a default the way a user would write it."""
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if value >= size and value % size == 0:
            return f"{value / size:g}{unit}"
    return f"{value:g}s"


def _span(least: float, most: float, above: bool) -> str:
    return f"over {_short(least)} and at most {_short(most)}" if above else f"from {_short(least)} to {_short(most)}"


def seconds(value: object, *, option: str, least: float = 0.0, most: float = DAY, above: bool = False) -> float:
    """Seconds from a duration (``90``, ``2.5``, ``90s``, ``5m``, ``2h``, or a number) within the caller's bounds.

    ``least`` is allowed unless ``above``; ``most`` is allowed. Anything else
    is a one-line :class:`ConfigError` naming ``option``, the value and the
    accepted forms (durations are never secrets, so the value is shown).
    """
    found: float | None = None
    if isinstance(value, str):
        m = _DURATION.fullmatch(value.strip())
        found = float(m.group(1)) * _UNITS[m.group(2)] if m else None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        found = _finite(value)
    if found is None or found < least or (above and found == least) or found > most:
        shown = _shown(value)
        named = f"{option}={shown}" if option else shown
        raise ConfigError(f"{named} is not a duration {_span(least, most, above)}: write {DURATION_FORMS}")
    return found


def _finite(number: float) -> float | None:
    """``number`` as a float, or None: infinite, not a number, or an int too large for a float (``10**400``)."""
    try:
        found = float(number)
    except OverflowError:
        return None
    return found if math.isfinite(found) else None


def _shown(value: object) -> str:
    """A bad duration as its line shows it: a string's first 40 characters, an int too long to print as ``about 10**N``."""
    if isinstance(value, str):
        return repr(value[:40])
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"about {'-' if value < 0 else ''}10**{math.floor(math.log10(abs(value)))}"
    return repr(value)


def seconds_arg(*, least: float = 0.0, most: float = DAY, above: bool = False) -> Callable[[str], float]:
    """An argparse ``type=`` for a duration option: the same rule; argparse puts ``argument --NAME:`` before its line."""
    import argparse

    def parse(text: str) -> float:
        try:
            return seconds(text, option="", least=least, most=most, above=above)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "duration"  # argparse names the type in its own messages
    return parse


def env_seconds(name: str, default: float, *, least: float = 0.0, most: float = DAY, above: bool = False,
                say: Callable[[str], None] | None = None) -> float:
    """The duration in environment variable ``name`` (read now, never at import), or ``default`` when unset.

    A bad value is one line, once per process and value, through ``say``
    (default :func:`chat_magic.console.say`, which prefixes ``chat_magic:``),
    and ``default``: these are read deep inside delivery, where raising would
    cost a message.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return seconds(raw, option=name, least=least, most=most, above=above)
    except ConfigError as e:
        if f"{name}={raw}" not in _said:
            _said.add(f"{name}={raw}")
            line = f"{e}; using {_short(default)}"
            if say is None:
                from .console import say as console_say

                console_say(line)
            else:
                say(f"chat_magic: {line}")
        return default
