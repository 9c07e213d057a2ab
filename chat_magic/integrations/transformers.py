"""``ChatCallback`` for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[ChatCallback()])``.

The Trainer reports metrics in two hooks: ``on_log`` (training: ``loss``,
``grad_norm``, ``learning_rate``) and ``on_evaluate`` (``eval_loss`` and the
``compute_metrics`` values).

- Epoch-based training (``logging_strategy`` and ``eval_strategy`` both
  ``"epoch"``): both hooks come *after* ``on_epoch_end``, so an epoch's values
  are gathered until the next epoch begins (or training ends) and recorded
  then, one point per epoch.
- Step-based training (a ``"steps"`` strategy or ``max_steps``, the usual LLM
  fine-tune): every log and every evaluation is a point at its global step,
  with a progress line ``step 450/1,200 · loss 0.31`` (every log, or every
  ``every_n_steps``), and the card says ``Steps: 450 of 1,200``.

Timing and throughput figures (``*_runtime``, ``*_per_second``) and the
closing summary log (``train_runtime``, ``train_loss``) are left out.

How the run ended, from the Trainer's own state: ``TrainerControl.should_training_stop``
before ``max_steps`` (by ``EarlyStoppingCallback``: its patience; or by
another callback), ``state.best_model_checkpoint`` (named, and said restored
with ``load_best_model_at_end``), ``metric_for_best_model`` and
``greater_is_better`` (the direction of "best" for that metric). A NaN or
infinite loss or eval metric makes the run diverged.

The Trainer calls no hook when training raises, so while a ``ChatCallback``
exists ``transformers.Trainer.train`` is wrapped (see
:func:`chat_magic.integrations._base.guard`): a crash in a trainer that
holds one posts the failure card and the same exception reaches the caller.
The rank is the Trainer's ``args.process_index`` of ``args.world_size``.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["ChatCallback"]

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as e:  # one line saying what to install, as the Lightning callback does
    raise ModuleNotFoundError(
        "chat_magic.integrations.transformers needs Hugging Face Transformers and PyTorch: "
        f"pip install transformers accelerate torch (no module {getattr(e, 'name', None) or str(e)!r})",
        name=getattr(e, "name", None)) from None

from ..metrics import MAX, MIN
from ..ranks import RankInfo
from ..report import OK, STOPPED
from ._base import Ending, TrainingWatch, early_reason, guard, model_name


def _ours(args: tuple, kwargs: dict) -> list[ChatCallback]:
    """The ChatCallbacks of the Trainer whose ``train`` is called."""
    handler = getattr(args[0], "callback_handler", None) if args else None
    return [c for c in getattr(handler, "callbacks", []) if isinstance(c, ChatCallback)]


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


class ChatCallback(TrainerCallback):
    """Post training start, progress, end and crashes to the session's thread.

    ``label``: the run's name (default: ``args.run_name``, else
    ``"<ModelClass> training"``). Other options as for the Lightning callback,
    and ``every_n_steps`` (step-based training: a line every n steps).
    """

    def __init__(self, label: str | None = None, **options: Any) -> None:
        super().__init__()
        self.watch = TrainingWatch(label, **options)
        self._pending: dict[str, Any] = {}
        self._epoch = 0  # epochs ended so far
        self._steps = False  # step-based: a point per log/evaluation
        self._trainer: Any = None  # the Trainer whose train() holds this callback (read from the call)
        guard(transformers.Trainer, "train", _ours, owner=self)

    def _entered(self, args: tuple, kwargs: dict) -> None:
        self._trainer = args[0] if args else None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        planned = getattr(state, "num_train_epochs", None) or getattr(args, "num_train_epochs", None)
        name = model_name(model)
        run_name = getattr(args, "run_name", None)
        if run_name == getattr(args, "output_dir", None):  # older versions default run_name to the output folder
            run_name = None
        self._pending, self._epoch = {}, 0
        self._steps = "steps" in (_strategy(args.logging_strategy), _strategy(args.eval_strategy)) or (args.max_steps or 0) > 0
        self.watch.begin(
            name=run_name if isinstance(run_name, str) and run_name.strip() else f"{name} training",
            model=name,
            epochs=math.ceil(planned) if planned else None,
            rank=RankInfo(int(args.process_index), int(args.world_size), "transformers"),
            steps=getattr(state, "max_steps", None) if self._steps else None,
            unit="step" if self._steps else "epoch",
        )
        best = getattr(args, "metric_for_best_model", None)
        if best:
            metric = best if best.startswith("eval_") else f"eval_{best}"
            self.watch.goal(metric, MAX if args.greater_is_better else MIN)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch += 1
        if self._steps:
            self.watch.epoch(self._epoch, {})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.watch.alive()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not logs or "train_runtime" in logs:  # the closing summary repeats the run's figures
            return
        if self._steps:
            if not any(k.startswith("eval_") for k in logs):  # an evaluation's log repeats on_evaluate's metrics
                self.watch.step(int(state.global_step), logs)
        else:
            self._pending.update(logs)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self._steps:
            self.watch.step(int(state.global_step), metrics or {})
        else:
            self._pending.update(metrics or {})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record()
        try:
            ending = self._ending(args, state, control)
        except Exception:
            ending = Ending()
        self.watch.end(None, ending)

    def _record(self) -> None:
        """Record what the last ended epoch logged (called when the next begins, or at the end)."""
        if self._epoch and self._pending and not self._steps:
            self.watch.epoch(self._epoch, self._pending)
        self._pending = {}

    # -- how it ended ------------------------------------------------------------

    def _ending(self, args: Any, state: Any, control: Any) -> Ending:
        facts: dict[str, str] = {}
        best_ckpt = getattr(state, "best_model_checkpoint", None)
        restored = bool(best_ckpt and args.load_best_model_at_end)
        if best_ckpt:
            facts["Best checkpoint"] = f"{best_ckpt}" + (f" ({args.metric_for_best_model} {state.best_metric:.4g})"
                                                         if state.best_metric is not None else "")
        step, planned = int(state.global_step), int(state.max_steps or 0)
        if not planned or step >= planned:
            return Ending(OK, "", facts)
        by, what = "a callback (TrainerControl.should_training_stop)", ""
        for cb in getattr(getattr(self._trainer, "callback_handler", None), "callbacks", []):
            if isinstance(cb, transformers.EarlyStoppingCallback) and cb.early_stopping_patience_counter >= cb.early_stopping_patience:
                by = "EarlyStoppingCallback"
                what = f"{args.metric_for_best_model} did not improve for {cb.early_stopping_patience} evaluations"
        reason = early_reason(by, step, planned, what, unit="step")
        if self._epoch and self.watch.planned:
            reason += f" (epoch {self._epoch} of {self.watch.planned})"
        if restored:
            m = re.search(r"checkpoint-(\d+)", str(best_ckpt))
            reason += f"; best checkpoint{f' (step {int(m.group(1)):,})' if m else ''} restored"
        return Ending(STOPPED, reason, facts)
