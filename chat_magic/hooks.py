"""Where one module registers what another calls, so that neither imports the other.

Nothing here imports any other chat_magic module: every module may import
this one without making a cycle.

- ``entry``: named callables the package calls without an import statement.
  ``entry["send"]`` is :func:`chat_magic.delivery.send`, registered when that
  module is imported: a ``__del__`` late in shutdown, when no import works,
  still finds it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["entry"]

entry: dict[str, Any] = {}  # name -> callable, registered at the defining module's import
