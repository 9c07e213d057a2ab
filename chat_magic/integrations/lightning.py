"""``ChatCallback`` for Lightning 2.x: ``Trainer(callbacks=[ChatCallback()])``.

Works with ``import lightning`` and with ``import pytorch_lightning``: the
class derives from the ``Callback`` of each package that is installed, so
either ``Trainer`` accepts it.

Hooks: ``on_fit_start`` (start line), ``on_train_epoch_end`` (the epoch's
metrics from ``trainer.callback_metrics``, which by then hold the epoch's
validation values too), ``on_fit_end`` (final card), ``on_exception`` (failure
card; Lightning re-raises the exception to the caller, and turns Ctrl-C into
``SystemExit(1)`` after this hook, reported as interrupted). The rank is
Lightning's own ``trainer.global_rank`` of ``trainer.world_size``.

Metric names: a value logged with ``on_step=True, on_epoch=True`` appears as
``name``, ``name_step`` and ``name_epoch``; the card keeps ``name`` (the
epoch value) and drops the step-level twins.
"""

from __future__ import annotations

from typing import Any

from ..ranks import RankInfo
from ._base import TrainingWatch, model_name


def _bases() -> tuple[type, ...]:
    bases: list[type] = []
    try:
        from lightning.pytorch import Callback as LightningCallback

        bases.append(LightningCallback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as PLCallback

        if PLCallback not in bases:
            bases.append(PLCallback)
    except ImportError:
        pass
    if not bases:
        raise ImportError("chat_magic.integrations.lightning needs Lightning: pip install lightning (or pytorch-lightning)")
    return tuple(bases)


def epoch_metrics(callback_metrics: dict[str, Any]) -> dict[str, Any]:
    """The epoch-level metrics: ``x_step`` dropped, ``x_epoch`` dropped when ``x`` is there."""
    names = set(callback_metrics)
    out = {}
    for name, value in callback_metrics.items():
        if name.endswith("_step") and (name[:-5] in names or f"{name[:-5]}_epoch" in names):
            continue
        if name.endswith("_epoch") and name[:-6] in names:
            continue
        out[name] = value
    return out


class ChatCallback(*_bases()):  # type: ignore[misc]
    """Post training start, epochs, end and crashes to the session's thread.

    ``label``: the run's name (default: ``"<ModelClass> training"``). ``to``,
    ``mention``, ``thread_key``, ``cards``, ``ranks``: as for
    :class:`~chat_magic.notify_when_done`. ``on``: ``"epoch"`` (start line,
    epoch lines, final card; default), ``"end"`` (final card), ``"error"``
    (failures only). ``every_n_epochs``: an epoch line every n epochs.
    ``metrics``: names or globs to show (default: all), or a function.
    """

    def __init__(self, label: str | None = None, **options: Any) -> None:
        super().__init__()
        self.watch = TrainingWatch(label, **options)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        rank = RankInfo(int(trainer.global_rank), int(trainer.world_size), "lightning")
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        name = model_name(pl_module)
        self.watch.begin(name=f"{name} training", model=name, epochs=epochs, rank=rank)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        self.watch.epoch(int(trainer.current_epoch) + 1, epoch_metrics(dict(trainer.callback_metrics)))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self.watch.step()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.watch.end(None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.watch.end(exception)
