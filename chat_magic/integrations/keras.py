"""``ChatCallback`` for Keras 3 (any backend): ``model.fit(..., callbacks=[ChatCallback()])``.

Hooks: ``on_train_begin`` (start line; epochs from ``params["epochs"]``),
``on_epoch_end`` (the ``logs``: ``loss``, ``val_loss`` and the compiled
metrics), ``on_train_end`` (final card). Epochs are 1-based, as Keras prints
them and as ``ModelCheckpoint`` formats ``{epoch}``.

How the run ended, from Keras' own state: ``model.stop_training`` set by an
``EarlyStopping`` (its ``stopped_epoch``, ``monitor``, ``best_epoch`` and
whether ``restore_best_weights`` put that epoch's weights back), by
``TerminateOnNaN`` (the loss went NaN or infinite: diverged), or by another
callback (named by its class). The ``mode`` of an ``EarlyStopping`` or
``ModelCheckpoint`` sets the direction of "best" for its ``monitor``; the
checkpoint file of the best epoch is named when it exists.

Keras calls no hook when ``fit`` raises, so importing this module wraps
``keras.Model.fit`` (see :func:`chat_magic.integrations._base.guard`): a
crash inside a ``fit`` that holds a ``ChatCallback`` posts the failure card
and the same exception reaches the caller; a ``fit`` without one runs
untouched. (``model.fit(callbacks=[ChatCallback()])`` looks ``fit`` up
before the callback is built: a wrapper installed by the callback would miss
that call.) The rank
comes from the environment (:mod:`chat_magic.ranks`).

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
from ..report import OK, STOPPED
from ._base import Ending, TrainingWatch, early_reason, guard

__all__ = ["ChatCallback"]

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


def _ours(args: tuple, kwargs: dict) -> list[ChatCallback]:
    """The ChatCallbacks in a ``fit`` call's ``callbacks`` (keyword, or the 7th positional argument)."""
    callbacks = kwargs.get("callbacks", args[6] if len(args) > 6 else None)
    if callbacks is None:
        return []
    try:
        return [c for c in callbacks if isinstance(c, ChatCallback)]
    except TypeError:
        return []


class ChatCallback(keras.callbacks.Callback):
    """Post training start, epochs, end and crashes to the session's thread.

    ``label``: the run's name (default: ``"<model name> training"``). Other
    options as for the Lightning callback: ``to``, ``mention``, ``on``
    (``"epoch"``, ``"end"``, ``"error"``), ``every_n_epochs``,
    ``progress_every``, ``metrics``, ``thread_key``, ``cards``, ``ranks``.
    """

    def __init__(self, label: str | None = None, **options: Any) -> None:
        super().__init__()
        self.watch = TrainingWatch(label, **options)
        self._siblings: list[Any] = []  # the other callbacks of the fit call (read from the call)
        self._logs: dict[int, dict[str, Any]] = {}  # each epoch's logs (1-based): the best checkpoint's name

    def _entered(self, args: tuple, kwargs: dict) -> None:
        """``fit`` was called with this callback: remember its other callbacks."""
        callbacks = kwargs.get("callbacks", args[6] if len(args) > 6 else None) or []
        self._siblings = [c for c in callbacks if c is not self]

    def on_train_begin(self, logs: Any = None) -> None:
        model = getattr(self, "model", None)
        name = getattr(model, "name", None) or type(model).__name__
        kind = type(model).__name__
        self._logs = {}
        self.watch.begin(name=f"{name} training", model=kind if kind == name else f"{name} ({kind})",
                         epochs=(self.params or {}).get("epochs"))
        for cb in self._siblings:
            if isinstance(cb, (keras.callbacks.EarlyStopping, keras.callbacks.ModelCheckpoint)):
                self.watch.goal(getattr(cb, "monitor", None), getattr(cb, "mode", None))

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._logs[int(epoch) + 1] = dict(logs or {})
        self.watch.epoch(int(epoch) + 1, dict(logs or {}))

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.watch.alive()

    def on_train_end(self, logs: Any = None) -> None:
        try:
            ending = self._ending()
        except Exception:
            ending = Ending()
        self.watch.end(None, ending)

    # -- how it ended ------------------------------------------------------------

    def _ending(self) -> Ending:
        planned, done = self.watch.planned, self.watch.done
        facts = self._best_checkpoint()
        if not getattr(self.model, "stop_training", False) or (planned and done >= planned):
            return Ending(OK, "", facts)
        for cb in self._siblings:
            if isinstance(cb, keras.callbacks.EarlyStopping) and getattr(cb, "stopped_epoch", 0) > 0:
                best = int(getattr(cb, "best_epoch", 0)) + 1
                restored = cb.restore_best_weights and getattr(cb, "best_weights", None) is not None
                facts["Best epoch"] = f"{best} ({'weights restored' if restored else 'weights of the last epoch kept'})"
                what = f"{cb.monitor} did not improve for {cb.patience} epochs" if cb.patience else cb.monitor
                reason = early_reason("EarlyStopping", int(cb.stopped_epoch) + 1, planned, what)
                return Ending(STOPPED, reason + (f"; best epoch {best} restored" if restored else ""), facts)
        for cb in self._siblings:
            if isinstance(cb, keras.callbacks.TerminateOnNaN):
                return Ending(STOPPED, early_reason("TerminateOnNaN", done or None, planned, "the loss went NaN or infinite"), facts)
        others = [type(cb).__name__ for cb in self._siblings if not isinstance(cb, (keras.callbacks.History, keras.callbacks.ProgbarLogger))]
        by = " or ".join(others) if others else "the model (model.stop_training)"
        return Ending(STOPPED, early_reason(by, done or None, planned), facts)

    def _best_checkpoint(self) -> dict[str, str]:
        """``{"Best checkpoint": path}``: the file a ModelCheckpoint saved at its monitor's best epoch, if it exists."""
        run = self.watch.run
        for cb in self._siblings:
            if not isinstance(cb, keras.callbacks.ModelCheckpoint) or run is None or cb.monitor not in run.metrics.names:
                continue
            summary = run.metrics.summary(cb.monitor)
            epoch = summary.best_step if summary.best is not None else None
            if epoch is None:
                continue
            path = cb._get_file_path(epoch - 1, None, self._logs.get(epoch, {}))
            if os.path.exists(path):
                return {"Best checkpoint": f"{path} (epoch {epoch}, {cb.monitor} {summary.best:.4g})"}
        return {}


guard(keras.Model, "fit", _ours)  # here, not in ChatCallback(): `fit` is looked up before its arguments are built
