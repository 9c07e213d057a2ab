#!/usr/bin/env python
"""What the training callbacks add to each epoch and each step, as a ratio of its own time.

    python benchmarks/callbacks.py [--quick] [--only lightning keras transformers ...] [--out PATH]

For each framework that is installed, a tiny model on synthetic data (CPU,
a few batches an epoch: the worst case, where the callback's share is
largest) is trained ``repeats`` times without and with ``ChatCallback()``,
alternating, in one run. Per epoch: Lightning, Keras, HF (epoch strategy).
Per step (step-based training, a point and a line at every step): HF with
``logging_steps=1``, Lightning with ``max_steps`` and ``every_n_steps=1``.
Per result: Ray Tune (a trainable reporting every iteration; Tune's hooks run
in this process) and Ray Train (``TorchTrainer``, one CPU worker; its hooks
run in Ray's controller actor, so only the wall ratio). Two figures each:

- *hook time*: the time spent inside the callback's own hooks (every
  ``on_*``/``after_*`` method of ``ChatCallback``, measured around each call),
  per unit, start and end included; divided by the median unit time without
  the callback, it is the added cost per epoch (or step, or result);
- *wall ratio*: median fit time with / without the callback (includes the
  noise of a shared machine; the hook time is the precise figure).

Also the cost of one ``notify_when_done(...).log(...)`` call. Notices go to
the project's emulator in this process (real HTTP on loopback); the delivery
worker sends in the background, as in real use. Writes a markdown table to
stdout and to ``benchmarks/callbacks_results.md``. A measurement, not a test:
exits 0 unless a scenario crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def emulator_space() -> Iterator[None]:
    """A private outbox and an emulator space without a quota: the figures are the caller's cost."""
    from chat_magic import delivery, session
    from chat_magic.emulator import Emulator

    emu = Emulator(qps=1000.0, strict=True).start()
    home = tempfile.mkdtemp(prefix="chat-magic-bench-")
    saved = {k: os.environ.get(k) for k in ("GOOGLE_CHAT_WEBHOOK_URL", "CHAT_MAGIC_HOME")}
    os.environ["GOOGLE_CHAT_WEBHOOK_URL"] = emu.webhook_url(space="BENCH", key="bench-key-" + "k" * 20, token="bench-token-" + "t" * 20)
    os.environ["CHAT_MAGIC_HOME"] = home
    try:
        yield
        import chat_magic

        chat_magic.flush(60)
    finally:
        delivery.shutdown()
        session.set_session(None)
        emu.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def hook_timer(cls: type) -> Iterator[list[float]]:
    """Time every call of ``cls``'s own ``on_*`` hooks; yields the list of durations."""
    spent: list[float] = []
    originals = {n: f for n, f in vars(cls).items() if n.startswith(("on_", "after_")) and callable(f)}

    def timed(fn: Callable) -> Callable:
        def hook(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t)

        return hook

    for name, fn in originals.items():
        setattr(cls, name, timed(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(cls, name, fn)


# -- the frameworks: each returns fit(with_callback: bool) -> None, the callback class, epochs ------


def lightning_case(epochs: int) -> tuple[Callable[[bool], None], type]:
    import lightning as L
    import torch

    from chat_magic.integrations.lightning import ChatCallback

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, 3 * x + 1)
    train, val = torch.utils.data.DataLoader(ds, batch_size=16), torch.utils.data.DataLoader(ds, batch_size=64)

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(with_callback: bool) -> None:
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[ChatCallback()] if with_callback else [])
        trainer.fit(Regressor(), train, val)

    return fit, ChatCallback


def keras_case(epochs: int) -> tuple[Callable[[bool], None], type]:
    import keras
    import numpy as np

    from chat_magic.integrations.keras import ChatCallback

    rng = np.random.default_rng(0)
    x = rng.random((128, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)

    def fit(with_callback: bool) -> None:
        model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
        model.fit(x, y, epochs=epochs, batch_size=32, validation_split=0.25, verbose=0,
                  callbacks=[ChatCallback()] if with_callback else [])

    return fit, ChatCallback


def transformers_case(epochs: int) -> tuple[Callable[[bool], None], type]:
    import torch
    import transformers

    from chat_magic.integrations.transformers import ChatCallback

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    ids = torch.randint(1, 32, (32, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(ids[i, 0] > 16)} for i in range(32)]
    out = tempfile.mkdtemp(prefix="chat-magic-bench-hf-")

    def fit(with_callback: bool) -> None:
        args = transformers.TrainingArguments(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=8,
                                              eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
                                              report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=transformers.BertForSequenceClassification(config), args=args,
                                       train_dataset=data, eval_dataset=data[:16],
                                       callbacks=[ChatCallback()] if with_callback else [])
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # no log lines on stdout
        trainer.train()

    return fit, ChatCallback


def transformers_steps_case(steps: int) -> tuple[Callable[[bool], None], type]:
    import torch
    import transformers

    from chat_magic.integrations.transformers import ChatCallback

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    ids = torch.randint(1, 32, (32, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(ids[i, 0] > 16)} for i in range(32)]
    out = tempfile.mkdtemp(prefix="chat-magic-bench-hf-")

    def fit(with_callback: bool) -> None:
        args = transformers.TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8,
                                              logging_strategy="steps", logging_steps=1, save_strategy="no",
                                              report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=transformers.BertForSequenceClassification(config), args=args,
                                       train_dataset=data, callbacks=[ChatCallback()] if with_callback else [])
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        trainer.train()

    return fit, ChatCallback


def lightning_steps_case(steps: int) -> tuple[Callable[[bool], None], type]:
    import lightning as L
    import torch

    from chat_magic.integrations.lightning import ChatCallback

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, generator=g)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, 3 * x + 1), batch_size=8)

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(with_callback: bool) -> None:
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                            callbacks=[ChatCallback(every_n_steps=1)] if with_callback else [])
        trainer.fit(Regressor(), train)

    return fit, ChatCallback


def _ray_started() -> None:
    import ray

    if not ray.is_initialized():
        path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})


def _ray_trainable(config: dict) -> None:
    import ray.tune

    loss = 1.0
    for _ in range(config["iterations"]):
        loss *= 0.9
        ray.tune.report({"loss": loss})


def ray_tune_case(iterations: int) -> tuple[Callable[[bool], None], type]:
    from ray import tune

    from chat_magic.integrations.ray import ChatCallback

    _ray_started()
    out = tempfile.mkdtemp(prefix="chat-magic-bench-ray-")

    def fit(with_callback: bool) -> None:
        tuner = tune.Tuner(_ray_trainable, param_space={"iterations": iterations},
                           run_config=tune.RunConfig(storage_path=out, verbose=0,
                                                     callbacks=[ChatCallback(metric="loss", mode="min")] if with_callback else []))
        tuner.fit()

    return fit, ChatCallback


def _ray_train_loop(config: dict) -> None:
    import ray.train

    loss = 1.0
    for _ in range(config["reports"]):
        loss *= 0.9
        ray.train.report({"loss": loss})


def ray_train_case(reports: int) -> tuple[Callable[[bool], None], type]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from chat_magic.integrations.ray import ChatCallback

    _ray_started()
    out = tempfile.mkdtemp(prefix="chat-magic-bench-ray-")

    def fit(with_callback: bool) -> None:
        TorchTrainer(_ray_train_loop, train_loop_config={"reports": reports}, scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(storage_path=out, callbacks=[ChatCallback()] if with_callback else [])).fit()

    return fit, ChatCallback


# name -> (module that must be installed, case, unit, units per fit for (full, quick))
CASES: dict[str, tuple[str, Callable[[int], tuple[Callable[[bool], None], type]], str, tuple[int, int]]] = {
    "lightning": ("lightning", lightning_case, "epoch", (20, 8)),
    "keras": ("keras", keras_case, "epoch", (20, 8)),
    "transformers": ("transformers", transformers_case, "epoch", (10, 4)),
    "transformers-steps": ("transformers", transformers_steps_case, "step", (40, 16)),
    "lightning-steps": ("lightning", lightning_steps_case, "step", (64, 24)),
    "ray-tune": ("ray", ray_tune_case, "result", (40, 16)),
    "ray-train": ("ray", ray_train_case, "report", (20, 8)),
}


def measure(name: str, epochs: int, repeats: int) -> dict[str, Any]:
    module, make, unit, _ = CASES[name]
    if importlib.util.find_spec(module) is None:
        return {"framework": name, "skipped": f"{module} is not installed"}
    fit, callback_cls = make(epochs)
    fit(False)  # warm-up: imports, first-call compilation
    plain: list[float] = []
    watched: list[float] = []
    hooks: list[float] = []
    with emulator_space():
        fit(True)  # warm-up with the callback (first session header, worker start)
        for _ in range(repeats):
            t = time.perf_counter()
            fit(False)
            plain.append(time.perf_counter() - t)
            with hook_timer(callback_cls) as spent:
                t = time.perf_counter()
                fit(True)
                watched.append(time.perf_counter() - t)
            hooks.append(sum(spent))
    epoch = statistics.median(plain) / epochs
    hook = statistics.median(hooks) / epochs
    return {
        "framework": name, "epochs": epochs, "repeats": repeats, "unit": unit,
        "epoch_ms": epoch * 1000, "hook_ms": hook * 1000, "hook_ratio": hook / epoch,
        "wall_ratio": statistics.median(watched) / statistics.median(plain),
    }


def log_call_cost(n: int = 2000) -> float:
    """Microseconds per ``n.log(loss=..., acc=...)`` inside a notify_when_done block."""
    from chat_magic import notify_when_done

    with emulator_space(), notify_when_done("bench", cards=False) as nwd:
        t = time.perf_counter()
        for i in range(n):
            nwd.log(loss=1.0 / (i + 1), acc=i / n)
        return (time.perf_counter() - t) / n * 1e6


def table(results: list[dict[str, Any]], log_us: float) -> str:
    lines = [
        "| Framework | Unit | Units × repeats | A unit without callback | Callback hooks per unit | Added cost per unit | Wall time with / without |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['framework']} | | skipped: {r['skipped']} | | | | |")
            continue
        hooked = r["hook_ms"] > 0  # Ray Train's hooks run in its controller actor: not timed here
        hook = f"{r['hook_ms']:.3f} ms" if hooked else "in the actor"
        share = f"{r['hook_ratio'] * 100:.2f} %" if hooked else "–"
        lines.append(f"| {r['framework']} | {r['unit']} | {r['epochs']} × {r['repeats']} | {r['epoch_ms']:.1f} ms | {hook} | {share} | {r['wall_ratio']:.3f} |")
    lines.append("")
    lines.append(f"`notify_when_done(...).log(loss=..., acc=...)`: {log_us:.1f} µs a call.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs and repeats (about a minute)")
    p.add_argument("--only", nargs="+", choices=sorted(CASES), help="these frameworks only")
    p.add_argument("--out", default=None, help="where to write the table (default: benchmarks/callbacks_results.md after a full run; "
                                              "a --quick or --only run prints it only)")
    args = p.parse_args(argv)
    repeats = 2 if args.quick else 5
    crashed = False
    results = []
    for name in args.only or list(CASES):
        units = CASES[name][3][1 if args.quick else 0]
        try:
            results.append(measure(name, units, repeats if not name.startswith("ray") else min(repeats, 3)))
        except Exception:
            traceback.print_exc()
            results.append({"framework": name, "skipped": "crashed (see stderr)"})
            crashed = True
    body = table(results, log_call_cost())
    head = (f"# Training callbacks: added cost per epoch, step and result\n\n{datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs{' (quick)' if args.quick else ''}\n\n"
            "Tiny models, a few batches an epoch (the callback's share is largest there). "
            "Added cost = time inside the callback's hooks per unit (epoch, step, Ray result) / the unit's time without it. "
            "All measured side by side in this one run.\n")
    text = head + "\n" + body + "\n"
    print(text)
    out = args.out or (None if args.quick or args.only else HERE / "callbacks_results.md")
    if out is not None:  # the committed results stay those of a full run
        Path(out).write_text(text, encoding="utf-8")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
