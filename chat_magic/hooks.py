"""Where one module registers what another calls, so that neither imports the other.

Nothing here imports any other chat_magic module: every module may import
this one without making a cycle.

- ``entry``: named callables the package calls without an import statement.
  ``entry["send"]`` is :func:`chat_magic.delivery.send`, registered when that
  module is imported: a ``__del__`` late in shutdown, when no import works,
  still finds it.
- The life of an open block (a ``notify_when_done`` block, a ``%%chat`` cell,
  a callback's run, ``chat-magic run``: see :mod:`chat_magic.deadman`), for
  the modules that watch it. Each registers itself when it is imported, and
  is imported where its hooks must be in place:

  ========================  ===================================  ===================================
  list                      called with, when                    registered by (imported by)
  ========================  ===================================  ===================================
  :data:`on_arm`            ``(block, spec)``, a block opened     stalls, heartbeat (arming)
  :data:`on_progress`       ``(block, now)``, a sign of life      stalls (arming)
  :data:`on_close`          ``(block)``, a block closed           stalls, heartbeat, termination (arming)
  :data:`on_fired`          ``(spec, row)``, a death notice       heartbeat (deadman, below delivery:
                            was queued for an armed row           every process that fires imports it)
  ========================  ===================================  ===================================

- :data:`death_notices`: how the outbox's take-over of a vanished host's file
  words the death notices of the blocks it left armed;
  :mod:`chat_magic.deadman` sets it at its import (delivery imports deadman
  before it takes any file over).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Block", "DeathNotices", "call", "death_notices", "entry", "on_arm", "on_close", "on_fired", "on_progress"]

entry: dict[str, Any] = {}  # name -> callable, registered at the defining module's import


class Block(Protocol):
    """What a hook sees of an open block (:class:`chat_magic.deadman.Armed`)."""

    id: int  # its armed row in the outbox
    outbox: Any
    title: str
    started: float
    last_progress: str
    extra: dict[str, Any]  # a hook's own state for this block (heartbeat keeps its Redis name here)

    def record(self, text: str | None = None, *, force: bool = False) -> None: ...


# (outbox, armed rows, destination id -> URL) -> [(row, [JSON body, ...]), ...]
DeathNotices = Callable[[Any, list[dict[str, Any]], dict[Any, str]], list[tuple[dict[str, Any], list[str]]]]

on_arm: list[Callable[[Block, dict[str, Any]], None]] = []
on_progress: list[Callable[[Block, float], None]] = []
on_close: list[Callable[[Block], None]] = []
on_fired: list[Callable[[dict[str, Any], dict[str, Any]], None]] = []
death_notices: DeathNotices | None = None


def call(hooks: list[Callable[..., None]], *args: Any) -> list[BaseException]:
    """Call every hook of a list in order (a copy: one may register meanwhile); return what they raised.

    An interrupt (Ctrl-C) in one hook does not skip the others (a stall
    watch left running would post "no progress" for a closed block): the
    first is raised once every hook has run.
    """
    raised: list[BaseException] = []
    interrupted: BaseException | None = None
    for hook in list(hooks):
        try:
            hook(*args)
        except Exception as e:
            raised.append(e)
        except BaseException as e:
            interrupted = interrupted or e
    if interrupted is not None:
        raise interrupted
    return raised
