"""``ChatCallback`` for Keras 3 (any backend): ``model.fit(..., callbacks=[ChatCallback()])``.

Hooks: ``on_train_begin`` (start line; epochs from ``params["epochs"]``),
``on_epoch_end`` (the ``logs``: ``loss``, ``val_loss`` and the compiled
metrics), ``on_train_end`` (final card).

Keras calls no hook when ``fit`` raises, so creating a ``ChatCallback``
wraps ``keras.Model.fit`` once (see :func:`chat_magic.integrations._base.guard`):
a crash inside ``fit`` posts the failure card and the same exception reaches
the caller. The rank comes from the environment (:mod:`chat_magic.ranks`).

Keras 3 picks its backend from ``KERAS_BACKEND``, else ``~/.keras/keras.json``
(which Keras itself writes with ``tensorflow`` on first use), else
``tensorflow``. Without TensorFlow installed, importing Keras then fails with
"No module named 'tensorflow'" although torch or JAX is there. So, only when
the user has not set ``KERAS_BACKEND``, Keras is not imported yet and the
configured backend is not installed, importing this module sets
``KERAS_BACKEND`` to the first installed of torch, jax, tensorflow and says so
in one line. (The one place chat_magic reads the environment at import: Keras
reads it when it is imported, which is now.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

from ..console import say
from ._base import TrainingWatch, guard

BACKENDS = ("torch", "jax", "tensorflow")  # the order a missing backend is replaced in
INSTALL = "pip install keras, and a backend: pip install torch (or jax, or tensorflow)"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _configured_backend() -> str:
    """The backend Keras would load: the one in its ``keras.json``, else its default ``tensorflow``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~") if os.access(os.path.expanduser("~"), os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    return backend if isinstance(backend, str) and backend else "tensorflow"


def _choose_backend() -> None:
    """Set ``KERAS_BACKEND`` to an installed backend when the user chose none and Keras's own choice is not installed."""
    if "keras" in sys.modules or os.environ.get("KERAS_BACKEND"):
        return  # the user's choice, or Keras already loaded its backend
    configured = _configured_backend()
    if _installed(configured):
        return
    chosen = next((b for b in BACKENDS if _installed(b)), None)
    if chosen:
        os.environ["KERAS_BACKEND"] = chosen
        say(f"KERAS_BACKEND is not set and Keras's backend {configured} is not installed: using {chosen} "
            "(set KERAS_BACKEND to choose)")


def _not_loaded(e: ImportError) -> ModuleNotFoundError:
    """One line saying what to install: Keras itself, or the backend it tried to load."""
    missing = getattr(e, "name", None) or str(e)
    if missing.split(".")[0] == "keras":
        return ModuleNotFoundError(f"chat_magic.integrations.keras needs Keras 3: {INSTALL}", name=missing)
    backend = os.environ.get("KERAS_BACKEND") or _configured_backend()
    return ModuleNotFoundError(
        f"chat_magic.integrations.keras: Keras could not load its {backend} backend (no module {missing!r}): "
        f"pip install {backend}, or set KERAS_BACKEND to an installed one ({', '.join(BACKENDS)})", name=missing)


_choose_backend()
try:
    import keras
except ImportError as _e:
    raise _not_loaded(_e) from None


class ChatCallback(keras.callbacks.Callback):
    """Post training start, epochs, end and crashes to the session's thread.

    ``label``: the run's name (default: ``"<model name> training"``). Other
    options as for the Lightning callback: ``to``, ``mention``, ``on``
    (``"epoch"``, ``"end"``, ``"error"``), ``every_n_epochs``, ``metrics``,
    ``thread_key``, ``cards``, ``ranks``.
    """

    def __init__(self, label: str | None = None, **options: Any) -> None:
        super().__init__()
        self.watch = TrainingWatch(label, **options)
        guard(keras.Model, "fit")

    def on_train_begin(self, logs: Any = None) -> None:
        model = getattr(self, "model", None)
        name = getattr(model, "name", None) or type(model).__name__
        kind = type(model).__name__
        self.watch.begin(name=f"{name} training", model=kind if kind == name else f"{name} ({kind})",
                         epochs=(self.params or {}).get("epochs"))

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.watch.epoch(int(epoch) + 1, dict(logs or {}))

    def on_train_end(self, logs: Any = None) -> None:
        self.watch.end(None)
