"""``ChatCallback`` for Keras 3 (any backend): ``model.fit(..., callbacks=[ChatCallback()])``.

Hooks: ``on_train_begin`` (start line; epochs from ``params["epochs"]``),
``on_epoch_end`` (the ``logs``: ``loss``, ``val_loss`` and the compiled
metrics), ``on_train_end`` (final card).

Keras calls no hook when ``fit`` raises, so creating a ``ChatCallback``
wraps ``keras.Model.fit`` once (see :func:`chat_magic.integrations._base.guard`):
a crash inside ``fit`` posts the failure card and the same exception reaches
the caller. The rank comes from the environment (:mod:`chat_magic.ranks`).
"""

from __future__ import annotations

from typing import Any

import keras

from ._base import TrainingWatch, guard


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

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.watch.step()

    def on_train_end(self, logs: Any = None) -> None:
        self.watch.end(None)
