"""``ChatCallback`` for Lightning 2.x: ``Trainer(callbacks=[ChatCallback()])``.

Works with ``import lightning`` and with ``import pytorch_lightning``: the
class derives from the ``Callback`` of each package that is installed, so
either ``Trainer`` accepts it.

Hooks: ``on_fit_start`` (start line), ``on_train_epoch_end`` (the epoch's
metrics from ``trainer.callback_metrics``, which by then hold the epoch's
validation values too), ``on_fit_end`` (final card), ``on_exception`` (failure
card; Lightning re-raises the exception to the caller, and turns Ctrl-C into
``SystemExit(1)`` after this hook, reported as interrupted). The rank is
Lightning's own ``trainer.global_rank`` of ``trainer.world_size``. With
``max_steps`` and no ``max_epochs`` the run is step-based: a point and a line
every ``every_n_steps`` (default ``log_every_n_steps``) and at each validation.

Epochs are named as Lightning names them in checkpoint files: ``epoch=2`` is
the third epoch (``epoch=2 (3/4)`` in a progress line, ``best … (min,
epoch=2)`` in the card, next to ``Best checkpoint: …/epoch=2-step=18.ckpt``).

How the run ended: ``trainer.should_stop`` before ``max_epochs`` is stopped
early, by the ``EarlyStopping`` whose ``stopped_epoch`` is set (with its
``stopping_reason_message``), else by the model or another callback; a
monitored metric that went NaN or infinite is diverged. ``ModelCheckpoint``
and ``EarlyStopping`` ``monitor``/``mode`` set the direction of "best";
``best_model_path`` is named.

Metric names: a value logged with ``on_step=True, on_epoch=True`` appears as
``name``, ``name_step`` and ``name_epoch``; the card keeps ``name`` (the
epoch value) and drops the step-level twins.
"""

from __future__ import annotations

from typing import Any

from ..ranks import RankInfo
from ..report import OK, STOPPED
from ._base import Ending, TrainingWatch, early_reason, model_name

__all__ = ["ChatCallback", "epoch_metrics"]


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
    """Post training start, progress, end and crashes to the session's thread.

    ``label``: the run's name (default: ``"<ModelClass> training"``). ``to``,
    ``mention``, ``thread_key``, ``cards``, ``ranks``: as for
    :class:`~chat_magic.notify_when_done`. ``on``: ``"epoch"`` (start line,
    progress lines, final card; default), ``"end"`` (final card), ``"error"``
    (failures only). ``every_n_epochs``: an epoch line every n epochs;
    ``every_n_steps``: with ``max_steps`` (no ``max_epochs``), a step line
    every n steps (default: the Trainer's ``log_every_n_steps``).
    ``progress_every``: seconds between progress messages (default 300, the
    lines merged). ``metrics``: names or globs to show (default: all), or a function.
    """

    def __init__(self, label: str | None = None, **options: Any) -> None:
        super().__init__()
        self.watch = TrainingWatch(label, **options)
        self._steps = False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        rank = RankInfo(int(trainer.global_rank), int(trainer.world_size), "lightning")
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._steps = epochs is None and steps is not None
        name = model_name(pl_module)
        self.watch.begin(name=f"{name} training", model=name, epochs=epochs, rank=rank, steps=steps,
                         unit="step" if self._steps else "epoch=")
        if self._steps and self.watch.every_steps is None:
            self.watch.every_steps = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        for cb in _watched(trainer):
            self.watch.goal(getattr(cb, "monitor", None), getattr(cb, "mode", None))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.watch.alive()  # a sign of life for stall_after and death notices
        if not self._steps:
            return
        step = int(trainer.global_step)
        every = self.watch.every_steps or 50
        if step % every == 0:
            self.watch.step(step, step_metrics(dict(trainer.callback_metrics)))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._steps and not getattr(trainer, "sanity_checking", False):
            values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            self.watch.step(int(trainer.global_step), values)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        index = int(trainer.current_epoch)
        self.watch.epoch(index, epoch_metrics(dict(trainer.callback_metrics)), done=index + 1)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        try:
            ending = self._ending(trainer)
        except Exception:
            ending = Ending()
        self.watch.end(None, ending)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.watch.end(exception)

    def _ending(self, trainer: Any) -> Ending:
        """Stopped early (``trainer.should_stop`` before ``max_epochs``/``max_steps``), with the best checkpoint."""
        facts = {}
        ckpt: Any = getattr(trainer, "checkpoint_callback", None)
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if best:
            score = getattr(ckpt, "best_model_score", None)
            facts["Best checkpoint"] = best + (f" ({ckpt.monitor} {float(score):.4g})" if score is not None and ckpt.monitor else "")
        planned, done = self.watch.planned, self.watch.done
        step_cap = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        reached = (planned is not None and done >= planned) or (step_cap is not None and trainer.global_step >= step_cap)
        if not trainer.should_stop or reached:
            return Ending(OK, "", facts)
        for cb in trainer.callbacks:
            if type(cb).__name__ == "EarlyStopping" and getattr(cb, "stopped_epoch", 0) > 0:
                what = getattr(cb, "stopping_reason_message", None) or f"{cb.monitor} did not improve"
                return Ending(STOPPED, early_reason("EarlyStopping", int(cb.stopped_epoch), planned, _short(what), unit="epoch="), facts)
        return Ending(STOPPED, early_reason("the model or a callback (trainer.should_stop)", int(trainer.current_epoch), planned,
                                            unit="epoch="), facts)


def _watched(trainer: Any) -> list[Any]:
    """The trainer's ModelCheckpoint and EarlyStopping callbacks: their ``monitor`` and ``mode`` say what "best" is."""
    return [cb for cb in trainer.callbacks if type(cb).__name__ in ("ModelCheckpoint", "EarlyStopping") and getattr(cb, "monitor", None)]


def step_metrics(callback_metrics: dict[str, Any]) -> dict[str, Any]:
    """The step-level values: ``x_step`` as ``x``, ``x_epoch`` dropped."""
    out = {}
    for name, value in callback_metrics.items():
        if name.endswith("_epoch"):
            continue
        out[name[:-5] if name.endswith("_step") else name] = value
    return out


def _short(text: str) -> str:
    """Lightning's stopping message, first sentence, without its ``Monitored metric`` prefix."""
    first = str(text).strip().split(". ")[0]
    return first.removeprefix("Monitored metric ")
