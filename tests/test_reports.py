"""Reports that tell the truth (issue 19): sparklines, receipt callbacks, Run All totals.

Delivery runs against the emulator over real HTTP on loopback; every payload
the space accepts is validated with the official proto (the ``space`` fixtures).
"""

from __future__ import annotations

import math
import re
import subprocess
import threading
from collections import Counter

import pytest
from conftest import wait_until

import chat_magic
from chat_magic import metrics

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # keras + numpy 2

# -- 1. sparklines -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.1, 0.3, 1e-4, 2.5e-5, 0.7, 123.456])
@pytest.mark.parametrize("n", [5, 24, 50, 333, 2288])
def test_a_flat_series_draws_flat(value, n):
    line = metrics.sparkline([value] * n)
    assert len(set(line)) == 1, line


def test_a_nearly_flat_series_is_drawn_flat_but_a_real_change_is_not():
    assert len(set(metrics.sparkline([0.1 + 1e-17 * (i % 3) for i in range(50)]))) == 1
    assert metrics.sparkline([1.0, 2.0, 3.0]) == "▁▅█"


def test_nan_and_inf_get_their_own_mark_and_are_named():
    h = metrics.MetricHistory()
    for step, v in enumerate([0.5, 0.4, math.inf, math.nan], 1):
        h.record({"loss": v}, step=step)
    s = h.summary("loss")
    assert s.spark[2:] == metrics.BAD * 2 and metrics.BAD not in metrics.BARS and s.spark[:2] != metrics.BAD * 2
    assert "inf at epoch 3" in s.describe() and "non-finite" in s.describe()
    assert s.first_bad == (3, math.inf)
    card = metrics.card_section([s])
    assert "inf at epoch 3" in card["widgets"][0]["decoratedText"]["text"]
    # averaged buckets keep the mark: a NaN inside a long series still shows
    long = [0.5] * 100
    long[60] = math.nan
    assert metrics.BAD in metrics.sparkline(long)


# -- 8. receipt callbacks ------------------------------------------------------------------------


def test_a_callback_added_after_completion_fires_each_time(fast_space):
    r = chat_magic.send("one")
    r.wait(30)
    seen = []
    r.add_done_callback(lambda rc: seen.append("a"))
    r.add_done_callback(lambda rc: seen.append("b"))
    assert seen == ["a", "b"]


@pytest.mark.slow
def test_every_receipt_calls_back_exactly_once_whenever_the_callback_is_added(fast_space):
    """Thousands of receipts; callbacks added before, during and after delivery, from two threads."""
    calls: Counter = Counter()
    lock = threading.Lock()

    def cb(tag):
        def fire(r):
            with lock:
                calls[tag] += 1
        return fire

    receipts = []

    def add_later():  # a second thread adds callbacks while deliveries finish
        i = 0
        while i < n:
            if i < len(receipts):
                receipts[i].add_done_callback(cb(("late", i)))
                i += 1
    n = 2000
    t = threading.Thread(target=add_later)
    t.start()
    for i in range(n):
        r = chat_magic.send(f"m{i}")
        r.add_done_callback(cb(("early", i)))
        receipts.append(r)
    t.join(120)
    assert chat_magic.flush(120)
    for i, r in enumerate(receipts):
        r.add_done_callback(cb(("after", i)))
    expected = {(k, i) for k in ("early", "late", "after") for i in range(n)}
    wait_until(lambda: set(calls) == expected, 60, what="every callback")
    assert all(v == 1 for v in calls.values()), [k for k, v in calls.items() if v != 1][:5]


# -- 7. Run All ----------------------------------------------------------------------------------


def _runall_cards(space) -> list[dict]:
    assert chat_magic.flush(30)
    return [m["cardsV2"][0]["card"] for m in space.messages() if m.get("cardsV2")]


def _rows(card: dict) -> dict[str, str]:
    return {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"]
            for s in card["sections"] for w in s["widgets"] if "decoratedText" in w}


def _closed(ip, runs: int = 1) -> None:
    t = ip.magics_manager.registry["ChatMagics"]._runall
    wait_until(lambda: t.idle.is_set() and t.runs_closed >= runs, 30, what="the run to end")


def _seconds(text: str) -> float:
    value, unit = text.split()[:2]
    return float(value) / 1000 if unit == "ms" else float(value) if unit == "s" else 60.0 * float(value)


def test_run_all_total_is_first_start_to_last_end_without_the_quiet_wait(ip, space):
    ip.run_cell("%chat_autonotify --run-all --quiet 4")
    for src in ("a = 1", "import time; time.sleep(0.1)", "b = 2"):
        ip.run_cell(src, store_history=True)
    _closed(ip)
    (card,) = _runall_cards(space)
    assert card["header"]["title"].startswith("✅ Run of 4 cells finished"), "the enabling cell is counted"
    assert _seconds(_rows(card)["Duration"]) < 4, "the 4 s quiet wait after the last cell is not part of the total"


def test_run_all_names_the_cells_never_run_after_a_failure(ip, space, tmp_path):
    import nbformat

    # quiet 1.5 s: a loaded machine's pause between two cells (0.6 s) does not split the run
    sources = ["%chat_autonotify --run-all --quiet 1.5", "# Load\nx = 1", "# Train\nraise ValueError('diverged')",
               "# Evaluate\ny = x", "", "print('report')"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    path = tmp_path / "pipeline.ipynb"
    nbformat.write(nb, path)
    ip.user_ns["__vsc_ipynb_file__"] = str(path)
    try:
        for src in sources[:3]:  # Run All stops at the failing cell
            ip.run_cell(src, store_history=True)
        _closed(ip)
    finally:
        ip.user_ns.pop("__vsc_ipynb_file__", None)
    (card,) = _runall_cards(space)
    r = _rows(card)
    assert card["header"]["title"].startswith("❌ Run of 3 cells failed")
    assert r["Not run"] == "2 cells: Evaluate · print(&#x27;report&#x27;)"
    assert "ValueError: diverged" in r["Error"]


def test_a_failing_cell_already_reported_gets_one_failure_notice(ip, space):
    ip.run_cell("%chat_autonotify --run-all --quiet 1.5")  # a pause between two cells (0.6 s) does not split the run
    ip.run_cell("a = 1", store_history=True)
    ip.run_cell("# Fit\nimport chat_magic\nwith chat_magic.notify_when_done('fit'):\n    raise ValueError('loss is nan')",
                store_history=True)
    _closed(ip)
    cards = _runall_cards(space)
    assert len(cards) == 2, [c["header"]["title"] for c in cards]
    with_error = [c for c in cards if "Error" in _rows(c) or any(s.get("header") == "Traceback" for s in c["sections"])]
    assert [c["header"]["title"].split(" failed")[0] for c in with_error] == ["❌ fit"], "one failure notice for the cell"
    summary = cards[-1]
    assert summary["header"]["title"].startswith("❌ Run of 3 cells failed")
    assert _rows(summary)["Stopped at"].endswith("Fit (its failure notice is above)")


# -- 2-6. training callbacks with the real frameworks -----------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

from test_integrations import (  # noqa: E402
    _hf,
    _keras,
    _keras_model,
    _lightning,
    _loaders,
    _regressor,
    _xy,
    final_card,
    metric_rows,
    settle,
    text_of,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KERAS_BACKEND", "torch")


def card_rows(card: dict) -> dict[str, str]:
    return {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"]
            for w in card["sections"][0]["widgets"] if "decoratedText" in w}


def test_keras_early_stopping_says_by_whom_at_which_epoch_and_the_best_epoch_restored(space, tmp_path):
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    model, (x, y) = _keras_model(keras), _xy(np)
    # a falling loss never "improves" in mode max: EarlyStopping stops after `patience` epochs; its mode is the direction
    stop = keras.callbacks.EarlyStopping(monitor="loss", mode="max", patience=2, restore_best_weights=True)
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "best-{epoch:02d}.keras"), monitor="val_loss", mode="min", save_best_only=True)
    model.fit(x, y, epochs=40, batch_size=16, validation_split=0.25, verbose=0, callbacks=[ChatCallback(), stop, ckpt])
    assert stop.stopped_epoch == 2 and stop.best_epoch == 0
    card = final_card(settle(space))
    assert card["header"]["title"].startswith("⏹️ tiny_mlp training stopped early in ")
    r = card_rows(card)
    assert "by EarlyStopping (loss did not improve for 2 epochs) at epoch 3 of 40; best epoch 1 restored" in r["Why"]
    assert r["Best epoch"] == "1 (weights restored)" and r["Epochs"] == "3 of 40"
    m = metric_rows(card)
    assert "(max, epoch 1)" in m["loss"]["text"], "EarlyStopping's mode sets the direction"
    assert "(min, epoch " in m["val_loss"]["text"]
    best = int(m["val_loss"]["text"].split("(min, epoch ")[1].split(")")[0])
    assert r["Best checkpoint"].startswith(html_escape(str(tmp_path / f"best-{best:02d}.keras")))
    assert (tmp_path / f"best-{best:02d}.keras").exists()


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_keras_terminate_on_nan_is_diverged_naming_the_metric_and_epoch(space):
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    model, (x, y) = _keras_model(keras), _xy(np)
    y = y.copy()
    y[3] = np.inf  # the loss is infinite from the first batch
    model.fit(x, y, epochs=8, batch_size=16, validation_split=0.25, verbose=0,
              callbacks=[ChatCallback(), keras.callbacks.TerminateOnNaN()])
    card = final_card(settle(space))
    assert card["header"]["title"].startswith("⚠️ tiny_mlp training diverged in ")
    r = card_rows(card)
    assert r["Why"].startswith('<font color="#e37400">loss went ') and " at epoch 1; stopped by TerminateOnNaN" in r["Why"]
    assert "at epoch 1 of 8" in r["Why"] and r["Epochs"] == "1 of 8"
    assert "non-finite: " in metric_rows(card)["loss"]["text"]
    assert metric_rows(card)["loss"]["bottomLabel"] == "×"


def test_keras_forty_epochs_post_a_handful_of_messages_not_42(space):
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    model, (x, y) = _keras_model(keras), _xy(np)
    model.fit(x, y, epochs=40, batch_size=32, verbose=0, callbacks=[ChatCallback()])
    msgs = settle(space)
    ours = [m for m in msgs if "tiny_mlp" in json.dumps(m)]
    assert len(ours) <= 5, f"{len(ours)} messages for a 40-epoch run"
    assert "started:" in text_of(ours) and final_card(ours)["header"]["title"].startswith("✅ tiny_mlp training finished")
    assert card_rows(final_card(ours))["Epochs"] == "40 of 40"
    assert len(metric_rows(final_card(ours))["loss"]["bottomLabel"]) == 24, "every epoch still recorded"


def test_progress_lines_in_one_span_are_merged_into_one_message(space):
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    class Slow(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            import time

            time.sleep(0.15)

    model, (x, y) = _keras_model(keras), _xy(np)
    model.fit(x, y, epochs=12, batch_size=32, verbose=0, callbacks=[ChatCallback(progress_every=0.5), Slow()])
    msgs = settle(space)
    progress = [m["text"] for m in msgs if m.get("text", "").startswith("⏳")]
    numbers = [int(n) for n in re.findall(r"epoch (\d+)/12", "\n".join(progress))]
    assert numbers and numbers == list(range(1, len(numbers) + 1)), "each line once, in order, none skipped"
    assert len(progress) < len(numbers), f"lines of a span merged: {len(progress)} messages for {len(numbers)} lines"


def test_keras_crash_card_traceback_ends_at_the_users_frame_and_the_wrapper_goes_away(space):
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    class Boom(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise ValueError("bad batch in epoch 2")

    model, (x, y) = _keras_model(keras), _xy(np)
    cb = ChatCallback(on="end")
    with pytest.raises(ValueError, match="bad batch") as caught:
        model.fit(x, y, epochs=4, verbose=0, callbacks=[cb, Boom()])  # the user's frame
    card = final_card(settle(space))
    (tb,) = [s["widgets"][0]["textParagraph"]["text"] for s in card["sections"] if s.get("header") == "Traceback"]
    assert "model.fit(x, y, epochs=4, verbose=0, callbacks=[cb, Boom()])  # the user&#x27;s frame" in tb
    assert "_base.py" not in tb and "guard" not in tb, tb
    assert chat_magic.flush(30)
    posted = len(space.messages())

    # a fit without a ChatCallback: nothing around it; the wrapper's frame is hidden from IPython's and pytest's tracebacks
    del cb, caught
    with pytest.raises(ValueError) as plain:
        model.fit(x, y, epochs=4, verbose=0, callbacks=[Boom()])
    ours = [tb for tb in _walk(plain.value.__traceback__) if "chat_magic" in tb.tb_frame.f_code.co_filename]
    assert all(tb.tb_frame.f_locals.get("__tracebackhide__") for tb in ours), "no visible chat_magic frame"
    assert chat_magic.flush(30) and len(space.messages()) == posted, "a fit without the callback posts nothing"


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


@pytest.mark.slow
def test_hf_crash_card_traceback_is_the_users_and_the_wrapper_goes_with_the_last_callback(space, tmp_path):
    transformers = pytest.importorskip("transformers")
    from chat_magic.integrations import _base
    from chat_magic.integrations.transformers import ChatCallback

    trainer = _hf(tmp_path, ChatCallback(on="error"), crash=True)
    with pytest.raises(KeyError):
        trainer.train()  # the user's line
    card = final_card(settle(space))
    (tb,) = [s["widgets"][0]["textParagraph"]["text"] for s in card["sections"] if s.get("header") == "Traceback"]
    assert "_base.py" not in tb and "guard" not in tb, tb
    assert _base.guarded(transformers.Trainer, "train")
    # in a fresh interpreter (this one may keep trainers of other tests alive): the wrapper goes with the last callback
    code = ("import gc, transformers\nfrom chat_magic.integrations.transformers import ChatCallback\n"
            "original = transformers.Trainer.train\ncb = ChatCallback()\nassert transformers.Trainer.train is not original\n"
            "del cb\ngc.collect()\nassert transformers.Trainer.train is original\nprint('restored')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.stdout.strip() == "restored", out.stderr[-2000:]


def test_keras_links_the_active_wandb_and_mlflow_runs(space, monkeypatch):
    """W&B and MLflow runs live on their hosted services: stand-ins with the same names (no network)."""
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    wandb = types.SimpleNamespace(run=types.SimpleNamespace(url="https://wandb.ai/team/proj/runs/abc123"))
    info = types.SimpleNamespace(run_id="0f1e2d3c")
    mlflow = types.SimpleNamespace(active_run=lambda: types.SimpleNamespace(info=info), get_tracking_uri=lambda: "http://127.0.0.1:5000")
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    model, (x, y) = _keras_model(keras), _xy(np)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[ChatCallback()])
    r = card_rows(final_card(settle(space)))
    assert r["W&amp;B run"] == "https://wandb.ai/team/proj/runs/abc123"
    assert r["MLflow run"] == "0f1e2d3c at http://127.0.0.1:5000"


def _lightning_trainer(L, tmp_path, callbacks, epochs=10, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks,
                     num_sanity_val_steps=0, **kw)


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_lightning_early_stop_names_the_callback_epoch_and_the_best_checkpoint_as_lightning_names_it(space, tmp_path):
    L, torch = _lightning()
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from chat_magic.integrations.lightning import ChatCallback

    model, (train, val) = _regressor(L, torch), _loaders(torch)
    stop = EarlyStopping(monitor="train_loss", mode="max", patience=2)  # a falling loss never improves in mode max
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss", mode="min")
    trainer = _lightning_trainer(L, tmp_path, [ChatCallback(), stop, ckpt])
    trainer.fit(model, train, val)
    assert stop.stopped_epoch > 0
    card = final_card(settle(space))
    assert card["header"]["title"].startswith("⏹️ Regressor training stopped early in ")
    r = card_rows(card)
    assert "by EarlyStopping (train_loss did not improve in the last 2 records" in r["Why"]
    assert f"at epoch={stop.stopped_epoch} of 10" in r["Why"]
    assert r["Best checkpoint"].startswith(ckpt.best_model_path)
    m = metric_rows(card)
    epoch = os.path.basename(ckpt.best_model_path).split("-")[0]  # "epoch=2"
    assert f"(min, {epoch})" in m["val_loss"]["text"], "the card's epoch is the checkpoint file's epoch"
    assert "(max, epoch=0)" in m["train_loss"]["text"], "EarlyStopping's mode sets the direction"


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_lightning_nan_loss_is_diverged_naming_the_metric_and_epoch(space, tmp_path):
    L, torch = _lightning()
    from chat_magic.integrations.lightning import ChatCallback

    class Regressor(type(_regressor(L, torch))):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y) * (float("nan") if self.current_epoch >= 1 else 1.0)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

    model, (train, val) = Regressor(), _loaders(torch)
    _lightning_trainer(L, tmp_path, [ChatCallback()], epochs=3, enable_checkpointing=False).fit(model, train, val)
    card = final_card(settle(space))
    assert card["header"]["title"].startswith("⚠️ Regressor training diverged in ")
    assert re.search(r"(train|val)_loss went nan at epoch=1", card_rows(card)["Why"]), "the first metric to go NaN, and when"
    assert "non-finite: nan at epoch=1" in metric_rows(card)["train_loss"]["text"]


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_lightning_ctrl_c_is_interrupted_not_failed(space, tmp_path):
    L, torch = _lightning()
    from chat_magic.integrations.lightning import ChatCallback

    class Regressor(type(_regressor(L, torch))):  # noqa: F811
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1:
                raise KeyboardInterrupt
            return super().training_step(batch, batch_idx)

    model, (train, val) = Regressor(), _loaders(torch)
    with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into SystemExit(1) after the hooks
        _lightning_trainer(L, tmp_path, [ChatCallback()], epochs=3, enable_checkpointing=False).fit(model, train, val)
    card = final_card(settle(space))
    assert card["header"]["title"].startswith("⏸️ Regressor training interrupted")


@pytest.mark.slow
def test_hf_step_based_training_keeps_every_log_and_evaluation_and_says_the_step(space, tmp_path):
    pytest.importorskip("transformers")
    from chat_magic.integrations.transformers import ChatCallback

    trainer = _hf(tmp_path, ChatCallback(progress_every=0), epochs=1)
    trainer.args.eval_strategy = trainer.args.logging_strategy = "steps"
    trainer.args.max_steps, trainer.args.logging_steps, trainer.args.eval_steps = 12, 2, 4
    trainer.train()
    msgs = settle(space)
    logged = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(logged) == 6 and len(evals) == 3
    text = text_of(msgs)
    assert "12 steps planned" in text and "step 4/12 · " in text and "step 12/12 · " in text
    card = final_card(msgs)
    assert card_rows(card)["Steps"] == "12 of 12"
    m = metric_rows(card)
    assert len(m["loss"]["bottomLabel"]) == 6 and len(m["eval_loss"]["bottomLabel"]) == 3
    best = min(evals, key=lambda h: h["eval_loss"])
    assert f"(min, step {best['step']})" in m["eval_loss"]["text"]


@pytest.mark.slow
def test_hf_early_stopping_names_the_callback_step_and_the_restored_checkpoint(space, tmp_path):
    transformers = pytest.importorskip("transformers")
    from chat_magic.integrations.transformers import ChatCallback

    trainer = _hf(tmp_path, ChatCallback(), epochs=6)
    a = trainer.args
    a.save_strategy, a.load_best_model_at_end = "epoch", True
    a.metric_for_best_model, a.greater_is_better = "loss", True  # a falling eval_loss never improves
    trainer.add_callback(transformers.EarlyStoppingCallback(early_stopping_patience=1))
    trainer.train()
    assert trainer.state.global_step < trainer.state.max_steps
    card = final_card(settle(space))
    assert card["header"]["title"].startswith("⏹️ BertForSequenceClassification training stopped early in ")
    r = card_rows(card)
    assert "by EarlyStoppingCallback (loss did not improve for 1 evaluations)" in r["Why"]
    assert f"at step {trainer.state.global_step} of {trainer.state.max_steps}" in r["Why"]
    assert "best checkpoint (step 4) restored" in r["Why"]
    assert r["Best checkpoint"].startswith(html_escape(trainer.state.best_model_checkpoint))
    assert "(max, epoch 1)" in metric_rows(card)["eval_loss"]["text"], "greater_is_better sets the direction"


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_lightning_step_based_training_keeps_a_point_every_n_steps_and_says_the_step(space, tmp_path):
    L, torch = _lightning()
    from chat_magic.integrations.lightning import ChatCallback

    model, (train, val) = _regressor(L, torch), _loaders(torch)  # 6 batches an epoch
    trainer = L.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ChatCallback(every_n_steps=4, progress_every=0)], num_sanity_val_steps=0)
    trainer.fit(model, train, val)
    msgs = settle(space)
    text = text_of(msgs)
    assert "12 steps planned" in text and "step 4/12 · train_loss " in text and "step 12/12 · " in text
    card = final_card(msgs)
    assert card_rows(card)["Steps"] == "12 of 12"
    m = metric_rows(card)
    assert len(m["train_loss"]["bottomLabel"]) == 3, "a point at steps 4, 8, 12"
    assert "(min, step " in m["train_loss"]["text"]
