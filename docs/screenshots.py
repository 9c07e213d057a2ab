#!/usr/bin/env python
"""The README's training cards: four real Keras runs, posted to the emulator, photographed in its web view.

    KERAS_BACKEND=torch python docs/screenshots.py [--out docs/img]

Runs a tiny Keras model four ways (finished; stopped early by
``EarlyStopping``; diverged under ``TerminateOnNaN``; failed with an
exception), each with ``ChatCallback()`` posting to an emulator on loopback,
then opens the emulator's web view in headless Chromium (Debian's
``/usr/bin/chromium``, driven by Playwright) and saves each final card as a
PNG. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def runs(space_url: str) -> None:
    """Four runs, one space each, so each thread holds one final card."""
    import keras
    import numpy as np

    import chat_magic
    from chat_magic import session
    from chat_magic.integrations.keras import ChatCallback

    rng = np.random.default_rng(0)
    x = rng.random((256, 4)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((256, 1))).astype("float32")

    def model(name: str) -> keras.Model:
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)], name=name)
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
        return m

    class Boom(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                raise RuntimeError("CUDA out of memory (simulated) in epoch 4")

    noisy = (y + 0.4 * rng.standard_normal((256, 1))).astype("float32")  # a floor the validation loss cannot pass
    ckpt = str(Path(tempfile.mkdtemp()) / "best-{epoch:02d}.keras")
    scenarios = {
        "finished": (model("resnet_tiny"), y, 12, [keras.callbacks.ModelCheckpoint(ckpt, monitor="val_loss", save_best_only=True)]),
        "stopped": (model("resnet_tiny"), noisy, 60, [keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)]),
        "diverged": (model("resnet_tiny"), np.where(np.arange(256)[:, None] == 7, np.inf, y).astype("float32"), 8,
                     [keras.callbacks.TerminateOnNaN()]),
        "failed": (model("resnet_tiny"), y, 8, [Boom()]),
    }
    for name, (m, target, epochs, extra) in scenarios.items():
        os.environ["GOOGLE_CHAT_WEBHOOK_URL"] = space_url.replace("SPACE", name.upper())
        session.set_session(None)
        try:
            m.fit(x, target, epochs=epochs, batch_size=32, validation_split=0.25, verbose=0,
                  callbacks=[ChatCallback("nightly fine-tune"), *extra])
        except RuntimeError:
            pass
        chat_magic.flush(60)


def photograph(base: str, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 760, "height": 2400}, device_scale_factor=1)
        for name in ("finished", "stopped", "diverged", "failed"):
            page.goto(f"{base}/?space={name.upper()}")
            card = page.locator(".card").last
            card.wait_for()
            path = out / f"training-{name}.png"
            card.screenshot(path=str(path))
            saved.append(path)
        browser.close()
    return saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["CHAT_MAGIC_HOME"] = tempfile.mkdtemp(prefix="chat-magic-shots-")
    from chat_magic.emulator import Emulator

    emu = Emulator(qps=None, strict=True).start()
    try:
        runs(emu.webhook_url(space="SPACE", key="shots-key", token="shots-token"))
        for path in photograph(emu.base_url, out):
            print(path, path.stat().st_size, "bytes")
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
