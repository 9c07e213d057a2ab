"""``ChatCallback`` for Ray Train and Ray Tune: one thread per experiment.

Ray Train (``TorchTrainer`` and the other data-parallel trainers)::

    trainer = TorchTrainer(train_loop, scaling_config=ScalingConfig(num_workers=8),
                           run_config=RunConfig(callbacks=[ChatCallback()]))

Ray Tune::

    tuner = tune.Tuner(trainable, param_space=...,
                       run_config=tune.RunConfig(callbacks=[ChatCallback(metric="loss", mode="min")]))

What it posts into the session's thread (the notebook's or script's that
built the callback, whichever process the hooks run in):

- Ray Train: a start line (run name, workers), progress lines from the
  workers' ``ray.train.report`` (rank 0's metrics; one message per
  ``progress_every``, the lines merged), and a final card: status, duration,
  reports, the last checkpoint, per metric last/best and a sparkline. A
  worker that raises makes a failure card naming it: ``worker 1 of 2:
  ValueError: …``.
- Ray Tune: a start line (trials planned), a line per trial result (merged by
  the same cadence) and at once a line for each trial that fails, and a final
  card with the best trial (by ``metric``/``mode``, default: the first
  metric whose name says its direction), its config and its metrics'
  courses, and how many trials finished or failed. All trials failed: a
  failure card.

Ray Train 2 runs its callbacks in the controller actor, not in the driver: the
callback travels there with its webhook, thread key and outbox folder, and
posts through the host's durable outbox (delivered by that process, or by
the next chat_magic process on the host: the driver's ``flush()``). It is a
``ray.tune.Callback`` too (Tune runs those in the driver), and implements Ray
Train's controller, report and worker-group callback interfaces (a
``ray.train.UserCallback`` sees neither the start nor the end of a run).
"""

from __future__ import annotations

import os
from typing import Any

import ray.tune

from .. import config
from ..metrics import MAX, MIN, MetricHistory, direction, format_value
from ..report import FAILED, OK, exception_summary
from ..session import Session, current_session, set_session
from ._base import Ending, TrainingWatch

__all__ = ["ChatCallback", "WorkerFailed"]


def _train_bases() -> tuple[type, ...]:
    """Ray Train 2's controller, report and worker-group callback interfaces (none on Ray Train 1)."""
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback, WorkerGroupCallback
    except ImportError:
        return ()
    return (ControllerCallback, ReportCallback, WorkerGroupCallback)


class WorkerFailed(Exception):
    """A Ray Train worker raised: ``worker 1 of 2: ValueError: boom`` (the worker's exception is the cause)."""


class ChatCallback(ray.tune.Callback, *_train_bases()):  # type: ignore[misc]
    """Post a Ray Train run's or a Ray Tune sweep's start, progress, end and failures to one thread.

    ``label``: the run's name (default: the Train run's name, or ``"Ray Tune
    sweep"``). ``metric``, ``mode``: how Tune's best trial is chosen (``mode``
    ``"min"`` or ``"max"``; default: from the metric's name), and the
    direction of "best" in the card. ``to``, ``mention``, ``on``,
    ``progress_every``, ``metrics``, ``thread_key``, ``cards``: as for the
    other training callbacks.
    """

    def __init__(self, label: str | None = None, *, metric: str | None = None, mode: str | None = None,
                 thread_key: str | None = None, **options: Any) -> None:
        from ..errors import ConfigError

        super().__init__()
        if mode not in (None, MIN, MAX):
            raise ConfigError(f"mode={mode!r}: use 'min' or 'max'")
        session = current_session()
        self.thread_key = thread_key or session.thread_key  # the driver's thread, wherever the hooks run
        self._origin = (session.kind, session.source)
        self._home = str(config.home())  # the driver's outbox folder: the controller actor posts through it
        self._pid = os.getpid()
        self.metric, self.mode = metric, mode
        self.watch = TrainingWatch(label, thread_key=self.thread_key, **options)
        self.label = label
        # Tune
        self._trials: dict[str, MetricHistory] = {}
        self._failed: dict[str, str] = {}
        # Train
        self._reports = 0
        self._workers: int | None = None
        self._worker_error: Exception | None = None

    # -- where the hooks run ---------------------------------------------------------

    def _here(self) -> None:
        """In another process (Ray Train's controller actor): post through the driver's outbox and thread."""
        if os.getpid() == self._pid:
            return
        self._pid = os.getpid()
        os.environ["CHAT_MAGIC_HOME"] = self._home
        session = Session(thread_key=self.thread_key)
        session.kind, session.source = self._origin
        session.announce = False  # the driver's session announced the thread
        set_session(session)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    # -- Ray Train 2 (in the controller) ------------------------------------------

    def after_controller_start(self, train_run_context: Any) -> None:
        self._here()
        run_config = getattr(train_run_context, "run_config", None)
        scaling = getattr(train_run_context, "scaling_config", None)
        self._workers = getattr(scaling, "num_workers", None)
        self._reports, self._worker_error = 0, None
        name = getattr(run_config, "name", None) or "Ray Train run"
        plan = f"{self._workers} workers" if self._workers else "Ray Train"
        self.watch.begin(name=str(name), model="Ray Train", epochs=None, unit="report", plan=plan)
        if self._workers:
            self._fact("Workers", str(self._workers))
        self._goal_for(self.metric)

    def after_report(self, training_report: Any = None, metrics: Any = None, *args: Any, **kwargs: Any) -> None:
        if not isinstance(metrics, list):  # ray.train.UserCallback's signature: (run_context, metrics, checkpoint)
            metrics = kwargs.get("metrics", metrics)
        if not metrics:
            return
        self._reports += 1
        values = dict(metrics[0] or {})  # rank 0's: every rank reports the same step
        self._goal_for(self.metric or next((k for k in values if direction(k)), None))
        self.watch.step(self._reports, values)
        checkpoint = getattr(training_report, "checkpoint", None)
        path = getattr(checkpoint, "path", None)
        if path:
            self._fact("Last checkpoint", str(path))

    def after_worker_group_poll_status(self, worker_group_status: Any) -> None:
        errors = getattr(worker_group_status, "errors", None) or {}
        if errors and self._worker_error is None:
            rank = min(errors)
            cause = errors[rank]
            of = f" of {self._workers}" if self._workers else ""
            error = WorkerFailed(f"worker {rank}{of}: {exception_summary(cause)}")
            error.__cause__ = cause
            self._worker_error = error

    def after_controller_finish(self, result: Any) -> None:
        error = getattr(result, "error", None)
        if error is not None:
            self.watch.end(self._worker_error or error)
        else:
            self.watch.end(None, Ending(OK))

    def before_controller_abort(self) -> None:
        self.watch.end(KeyboardInterrupt("aborted"))

    # -- Ray Tune (in the driver) --------------------------------------------------------

    def setup(self, stop: Any = None, num_samples: Any = None, total_num_samples: Any = None, **info: Any) -> None:
        self._trials, self._failed = {}, {}
        n = total_num_samples if isinstance(total_num_samples, int) and total_num_samples > 0 else None
        self.watch.begin(name=self.label or "Ray Tune sweep", model="Ray Tune", epochs=None, unit="iteration",
                         plan=f"{n} trials planned" if n else "trials not fixed")
        if n:
            self._fact("Trials", f"0 of {n} done")
        self._total = n

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        history = self._trials.setdefault(trial.trial_id, MetricHistory(unit="iteration"))
        kept = self.watch.kept(result)
        step = int(result.get("training_iteration") or 0) or None
        history.record(kept, step=step)
        if self.watch.on == "epoch" and self.watch.run is not None:
            shown = " · ".join(f"{k} {format_value(history.last(k))}" for k in kept)
            self.watch.progress(f"trial {trial.trial_id} iteration {step or '?'} · {shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        why = _trial_error(trial)
        self._failed[trial.trial_id] = why
        run = self.watch.run
        if run is not None:
            run.update(f"❌ trial {trial.trial_id} failed: {why}")  # at once: a failure does not wait for the cadence

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        run = self.watch.run
        if run is None:
            return
        try:
            ending = self._sweep_ending(trials, run)
        except Exception as e:
            ending = Ending(OK, f"best trial unknown: {exception_summary(e)}")
        if ending.status == FAILED:
            self.watch.end(RuntimeError(ending.reason))
        else:
            self.watch.end(None, ending)

    def _sweep_ending(self, trials: list, run: Any) -> Ending:
        done = [t for t in trials if t.trial_id not in self._failed and getattr(t, "last_result", None)]
        facts = {"Trials": f"{len(trials)}: {len(done)} finished, {len(self._failed)} failed"}
        if not done:
            first = next(iter(self._failed.items()), None)
            return Ending(FAILED, f"all {len(trials)} trials failed" + (f"; trial {first[0]}: {first[1]}" if first else ""))
        metric = self.metric or next((k for k in self.watch.kept(done[0].last_result) if direction(k)), None)
        mode = self.mode or (direction(metric) if metric else None)
        best = done[0]
        if metric and mode:
            scored = [t for t in done if isinstance(t.last_result.get(metric), (int, float))]
            if scored:
                best = (min if mode == MIN else max)(scored, key=lambda t: t.last_result[metric])
            facts["Best trial"] = f"{best.trial_id}: {metric} {format_value(best.last_result.get(metric))} ({mode})"
        else:
            facts["Best trial"] = f"{best.trial_id} (no metric with a direction: give metric= and mode=)"
        facts["Best config"] = ", ".join(f"{k}={v!r}" for k, v in (getattr(best, "config", None) or {}).items())[:500]
        history = self._trials.get(best.trial_id)
        if history is not None:
            history.goals.update({metric: mode} if metric and mode else {})
            run.metrics = history  # the card's metrics: the best trial's courses
        if self._failed:
            facts["Failed trials"] = " · ".join(f"{tid}: {why}" for tid, why in self._failed.items())[:1000]
        return Ending(OK, "", facts)

    # -- helpers ------------------------------------------------------------------------

    def _fact(self, key: str, value: str) -> None:
        run = self.watch.run
        if run is not None:
            run.facts[key] = value

    def _goal_for(self, metric: str | None) -> None:
        if metric:
            self.watch.goal(metric, self.mode or direction(metric))


def _trial_error(trial: Any) -> str:
    """A failed trial's error, one line: from the trial's error file when Tune wrote one."""
    path = getattr(trial, "error_file", None)
    try:
        if path and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = [line.strip() for line in f.read().splitlines() if line.strip()]
            named = [line for line in lines if ":" in line and not line.startswith(("File ", "Traceback", "^", "~"))]
            return (named[-1] if named else lines[-1])[:300] if lines else "failed"
    except OSError:
        pass
    return str(getattr(trial, "error_msg", None) or "failed")[:300]
