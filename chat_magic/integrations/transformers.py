"""``ChatCallback`` for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[ChatCallback()])``.

The Trainer reports metrics in two hooks: ``on_log`` (training: ``loss``,
``grad_norm``, ``learning_rate``) and ``on_evaluate`` (``eval_loss`` and the
``compute_metrics`` values), both *after* ``on_epoch_end``. So an epoch's
values are gathered until the next epoch begins (or training ends) and
recorded then, one point per epoch: with ``eval_strategy="epoch"`` and
``logging_strategy="epoch"`` each epoch has its ``loss`` and ``eval_loss``.
Timing and throughput figures (``*_runtime``, ``*_per_second``) and the
closing summary log (``train_runtime``, ``train_loss``) are left out.

The Trainer calls no hook when training raises, so creating a
``ChatCallback`` wraps ``transformers.Trainer.train`` once (see
:func:`chat_magic.integrations._base.guard`): a crash posts the failure card
and the same exception reaches the caller. The rank is the Trainer's
``args.process_index`` of ``args.world_size``.
"""

from __future__ import annotations

import math
from typing import Any

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as e:  # one line saying what to install, as the Lightning callback does
    raise ModuleNotFoundError(
        "chat_magic.integrations.transformers needs Hugging Face Transformers and PyTorch: "
        f"pip install transformers accelerate torch (no module {getattr(e, 'name', None) or str(e)!r})",
        name=getattr(e, "name", None)) from None

from ..ranks import RankInfo
from ._base import TrainingWatch, guard, model_name


class ChatCallback(TrainerCallback):
    """Post training start, epochs, end and crashes to the session's thread.

    ``label``: the run's name (default: ``args.run_name``, else
    ``"<ModelClass> training"``). Other options as for the Lightning callback.
    """

    def __init__(self, label: str | None = None, **options: Any) -> None:
        super().__init__()
        self.watch = TrainingWatch(label, **options)
        self._pending: dict[str, Any] = {}
        self._epoch = 0  # epochs ended so far
        guard(transformers.Trainer, "train")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        planned = getattr(state, "num_train_epochs", None) or getattr(args, "num_train_epochs", None)
        name = model_name(model)
        run_name = getattr(args, "run_name", None)
        if run_name == getattr(args, "output_dir", None):  # older versions default run_name to the output folder
            run_name = None
        self._pending, self._epoch = {}, 0
        self.watch.begin(
            name=run_name if isinstance(run_name, str) and run_name.strip() else f"{name} training",
            model=name,
            epochs=math.ceil(planned) if planned else None,
            rank=RankInfo(int(args.process_index), int(args.world_size), "transformers"),
        )

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch += 1

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "train_runtime" not in logs:  # the closing summary repeats the run's figures
            self._pending.update(logs)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self._pending.update(metrics or {})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record()
        self.watch.end(None)

    def _record(self) -> None:
        """Record what the last ended epoch logged (called when the next begins, or at the end)."""
        if self._epoch and self._pending:
            self.watch.epoch(self._epoch, self._pending)
        self._pending = {}
