#!/usr/bin/env python
"""What the training callbacks add to each epoch, as a ratio of the epoch's own time.

    python benchmarks/callbacks.py [--quick] [--only lightning keras transformers] [--out PATH]

For each framework that is installed, a tiny model on synthetic data (CPU,
a few batches an epoch: the worst case, where the callback's share is
largest) is trained ``repeats`` times without and with ``ChatCallback()``,
alternating. Two figures per framework:

- *hook time*: the time spent inside the callback's own hooks (every
  ``on_*`` method of ``ChatCallback``, measured around each call), per epoch,
  start and end included; divided by the median epoch time without the
  callback, it is the added cost per epoch;
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
    originals = {n: f for n, f in vars(cls).items() if n.startswith("on_") and callable(f)}

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


CASES = {
    "lightning": ("lightning", lightning_case),
    "keras": ("keras", keras_case),
    "transformers": ("transformers", transformers_case),
}


def measure(name: str, epochs: int, repeats: int) -> dict[str, Any]:
    module, make = CASES[name]
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
        "framework": name, "epochs": epochs, "repeats": repeats,
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
        "| Framework | Epochs × repeats | Epoch without callback | Callback hooks per epoch | Added cost per epoch | Wall time with / without |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['framework']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {r['framework']} | {r['epochs']} × {r['repeats']} | {r['epoch_ms']:.1f} ms | {r['hook_ms']:.2f} ms | "
                     f"{r['hook_ratio'] * 100:.2f} % | {r['wall_ratio']:.3f} |")
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
    epochs, repeats = (8, 2) if args.quick else (20, 5)
    crashed = False
    results = []
    for name in args.only or list(CASES):
        try:
            results.append(measure(name, epochs if name != "transformers" else max(4, epochs // 2), repeats))
        except Exception:
            traceback.print_exc()
            results.append({"framework": name, "skipped": "crashed (see stderr)"})
            crashed = True
    body = table(results, log_call_cost())
    head = (f"# Training callbacks: added cost per epoch\n\n{datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs{' (quick)' if args.quick else ''}\n\n"
            "Tiny models, a few batches an epoch (the callback's share is largest there). "
            "Added cost = time inside the callback's hooks per epoch / the epoch's time without it.\n")
    text = head + "\n" + body + "\n"
    print(text)
    out = args.out or (None if args.quick or args.only else HERE / "callbacks_results.md")
    if out is not None:  # the committed results stay those of a full run
        Path(out).write_text(text, encoding="utf-8")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
