"""The Lightning, Keras and Hugging Face callbacks with the real frameworks on the CPU.

Tiny models built from code or configs, synthetic data, 2-4 epochs; nothing
is downloaded (``HF_HUB_OFFLINE=1``). Every notice goes through the outbox to
the emulator over real HTTP; the ``space`` fixture validates each accepted
payload with the official proto. A framework that is not installed skips its
tests with the reason (``pip install "chat-magic[ml]"``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import KEY, TOKEN, assert_no_secret, committed_clean

import chat_magic
from chat_magic import ConfigError
from chat_magic.metrics import BARS, format_value

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KERAS_BACKEND", "torch")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # keras + numpy 2
MISSING = 'not installed: pip install "chat-magic[ml]"'
SPARK = re.compile(f"^[{BARS}]+$")


# -- helpers ---------------------------------------------------------------------------


def settle(space) -> list[dict]:
    assert chat_magic.flush(60), "not delivered"
    msgs = space.messages()
    assert msgs
    assert len({m["thread"]["name"] for m in msgs}) == 1, "one thread"
    assert_no_secret(json.dumps(msgs))
    return msgs


def final_card(msgs: list[dict]) -> dict:
    cards = [m["cardsV2"][0]["card"] for m in msgs if m.get("cardsV2")]
    assert len(cards) == 1, f"one final card, got {[c['header']['title'] for c in cards]}"
    return cards[0]


def rows(card: dict) -> dict[str, str]:
    return {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"]
            for w in card["sections"][0]["widgets"] if "decoratedText" in w}


def metric_rows(card: dict) -> dict[str, dict]:
    sections = [s for s in card["sections"] if s.get("header") == "Metrics"]
    assert sections, "the card has a Metrics section"
    return {w["decoratedText"]["topLabel"]: w["decoratedText"] for w in sections[0]["widgets"] if "decoratedText" in w}


def text_of(msgs: list[dict]) -> str:
    return "\n".join(m.get("text", "") for m in msgs)


def epoch_lines(msgs: list[dict], planned: int) -> list[str]:
    # "epoch 3/4 · loss 0.2" (Keras, HF) or Lightning's "epoch=2 (3/4) · loss 0.2": the count of epochs done
    return re.findall(rf"epoch(?:=\d+ \(| )(\d+)/{planned}\)?((?: · \w+ [-\d.e+]+)*)", text_of(msgs))


# -- the package never imports a framework ---------------------------------------------------


def test_importing_chat_magic_imports_no_framework():
    code = (
        "import sys, chat_magic, chat_magic.integrations, chat_magic.notify, chat_magic.metrics, chat_magic.report,"
        " chat_magic.magics, chat_magic.runall, chat_magic.integrations._base\n"
        "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'keras', 'transformers',"
        " 'accelerate', 'tensorflow', 'jax', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_callback_options_are_checked_before_training(space):
    from chat_magic.integrations._base import TrainingWatch

    for bad, words in (({"on": "always"}, "on='always'"), ({"every_n_epochs": 0}, "every_n_epochs=0"),
                       ({"metrics": 3}, "metrics=3"), ({"mention": "alice"}, "mention="),
                       ({"to": "nowhere"}, "nowhere")):
        with pytest.raises(ConfigError, match=re.escape(words)) as e:
            TrainingWatch(**bad)
        assert "\n" not in str(e.value)


def test_no_webhook_is_a_one_line_config_error_at_construction(outbox_home):
    from chat_magic.integrations._base import TrainingWatch

    with pytest.raises(ConfigError) as e:
        TrainingWatch()
    assert "\n" not in str(e.value)


# -- Lightning --------------------------------------------------------------------------------


def _lightning():
    L = pytest.importorskip("lightning", reason=f"Lightning {MISSING}")
    torch = pytest.importorskip("torch", reason=f"torch {MISSING}")
    return L, torch


def _regressor(L, torch, crash_in_epoch: int | None = None):
    class Regressor(L.LightningModule):
        """y = 3x + 1 with noise; logs train_loss and val_loss per epoch."""

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.raised = None

        def training_step(self, batch, batch_idx):
            if crash_in_epoch is not None and self.current_epoch + 1 == crash_in_epoch and batch_idx == 1:
                self.raised = RuntimeError(f"loss diverged in epoch {crash_in_epoch}")
                raise self.raised
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Regressor()


def _loaders(torch, n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, generator=g)
    y = 3 * x + 1 + 0.05 * torch.randn(n, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    train, val = torch.utils.data.random_split(ds, [n * 3 // 4, n - n * 3 // 4], generator=g)
    return torch.utils.data.DataLoader(train, batch_size=8), torch.utils.data.DataLoader(val, batch_size=16)


def _trainer(L, tmp_path, callback, epochs=4):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                     callbacks=[callback], num_sanity_val_steps=0)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_lightning_fit_posts_start_epochs_and_a_card_with_both_metrics_and_sparklines(space, tmp_path):
    L, torch = _lightning()
    from chat_magic.integrations.lightning import ChatCallback

    model, (train, val) = _regressor(L, torch), _loaders(torch)
    trainer = _trainer(L, tmp_path, ChatCallback(progress_every=0))
    trainer.fit(model, train, val)
    msgs = settle(space)

    text = text_of(msgs)
    host = chat_magic.session.current_session().host
    assert f"▶️ *Regressor training* started: Regressor, 4 epochs planned, on {host}" in text
    lines = epoch_lines(msgs, 4)
    assert [n for n, _ in lines] == ["1", "2", "3", "4"], text
    for _, metrics in lines:
        assert " · train_loss " in metrics and " · val_loss " in metrics, "both metrics in every epoch line"
        assert "_step" not in metrics and "_epoch" not in metrics
    assert text.index("started:") < text.index("epoch=0 (1/4)") < text.index("epoch=3 (4/4)")

    card = final_card(msgs)
    assert card["header"]["title"].startswith("✅ Regressor training finished in ")
    assert rows(card)["Epochs"] == "4 of 4" and rows(card)["Model"] == "Regressor"
    metric = metric_rows(card)
    assert set(metric) == {"train_loss", "val_loss"}
    for name, row in metric.items():
        assert SPARK.match(row["bottomLabel"]) and len(row["bottomLabel"]) == 4, row
        assert row["text"].startswith(format_value(float(trainer.callback_metrics[name])) + " · best "), row
        assert "(min, epoch=" in row["text"], "epochs named as in Lightning's checkpoint files"
    # the message order: the final card after every epoch line
    at = next(i for i, m in enumerate(msgs) if m.get("cardsV2"))
    assert "epoch=3 (4/4)" in text_of(msgs[:at])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_lightning_crash_in_epoch_2_posts_the_exception_and_it_reaches_the_caller(space, tmp_path):
    L, torch = _lightning()
    from chat_magic.integrations.lightning import ChatCallback

    model, (train, val) = _regressor(L, torch, crash_in_epoch=2), _loaders(torch)
    with pytest.raises(RuntimeError, match="loss diverged in epoch 2") as caught:
        _trainer(L, tmp_path, ChatCallback(mention="all", progress_every=0)).fit(model, train, val)
    assert caught.value is model.raised, "the very exception reaches the caller"
    msgs = settle(space)

    card = final_card(msgs)
    assert card["header"]["title"].startswith("❌ Regressor training failed")
    r = rows(card)
    assert r["Error"].endswith("RuntimeError: loss diverged in epoch 2</font>")
    assert r["Epochs"] == "1 of 4", "one epoch completed before the crash"
    (tb,) = [s for s in card["sections"] if s.get("header") == "Traceback"]
    assert "training_step" in tb["widgets"][0]["textParagraph"]["text"]
    assert set(metric_rows(card)) == {"train_loss", "val_loss"}
    assert any(m.get("text", "").startswith("<users/all>") for m in msgs if m.get("cardsV2")), "mention= pings in the card"
    assert [n for n, _ in epoch_lines(msgs, 4)] == ["1"]


@pytest.mark.slow
def test_lightning_callback_is_accepted_by_pytorch_lightning_too(space):
    pl = pytest.importorskip("pytorch_lightning", reason=f"pytorch_lightning {MISSING}")
    from chat_magic.integrations.lightning import ChatCallback

    assert isinstance(ChatCallback(), pl.Callback)
    L = pytest.importorskip("lightning", reason=f"Lightning {MISSING}")
    assert isinstance(ChatCallback(), L.Callback)


# -- Keras --------------------------------------------------------------------------------------


def _keras():
    keras = pytest.importorskip("keras", reason=f"Keras {MISSING}")
    np = pytest.importorskip("numpy", reason=f"numpy {MISSING}")
    return keras, np


def _keras_model(keras):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)], name="tiny_mlp")
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    return model


def _xy(np, n=64):
    rng = np.random.default_rng(0)
    x = rng.random((n, 4)).astype("float32")
    return x, (x.sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((n, 1))).astype("float32")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_keras_fit_with_validation_split_gives_loss_and_val_loss(space):
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    model, (x, y) = _keras_model(keras), _xy(np)
    history = model.fit(x, y, epochs=3, batch_size=16, validation_split=0.25, verbose=0, callbacks=[ChatCallback(progress_every=0)])
    msgs = settle(space)

    assert "▶️ *tiny_mlp training* started: tiny_mlp (Sequential), 3 epochs planned" in text_of(msgs)
    lines = epoch_lines(msgs, 3)
    assert [n for n, _ in lines] == ["1", "2", "3"]
    assert all(" · loss " in m and " · val_loss " in m for _, m in lines)
    card = final_card(msgs)
    assert card["header"]["title"].startswith("✅ tiny_mlp training finished")
    metric = metric_rows(card)
    assert {"loss", "val_loss", "mae", "val_mae"} <= set(metric)
    for name in ("loss", "val_loss"):
        assert metric[name]["text"].startswith(format_value(history.history[name][-1]) + " · best ")
        assert SPARK.match(metric[name]["bottomLabel"]) and len(metric[name]["bottomLabel"]) == 3


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_keras_crash_posts_the_failure_and_the_same_exception_reaches_the_caller(space):
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    class Boom(keras.callbacks.Callback):
        raised = None

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                Boom.raised = ValueError("bad batch in epoch 2")
                raise Boom.raised

    model, (x, y) = _keras_model(keras), _xy(np)
    with pytest.raises(ValueError, match="bad batch in epoch 2") as caught:
        model.fit(x, y, epochs=4, batch_size=16, validation_split=0.25, verbose=0, callbacks=[ChatCallback(on="end"), Boom()])
    assert caught.value is Boom.raised
    msgs = settle(space)
    card = final_card(msgs)
    assert card["header"]["title"].startswith("❌ tiny_mlp training failed")
    assert rows(card)["Epochs"] == "1 of 4"
    assert "started:" not in text_of(msgs) and not epoch_lines(msgs, 4), "on='end': no start or epoch lines"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_keras_every_n_epochs_and_the_metric_filter(space):
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    model, (x, y) = _keras_model(keras), _xy(np)
    model.fit(x, y, epochs=4, batch_size=32, validation_split=0.25, verbose=0,
              callbacks=[ChatCallback("nightly", every_n_epochs=2, metrics=["val_*"], progress_every=0)])
    msgs = settle(space)
    lines = epoch_lines(msgs, 4)
    assert [n for n, _ in lines] == ["2", "4"]
    assert all(re.fullmatch(r" · val_loss \S+ · val_mae \S+", m) for _, m in lines), lines
    card = final_card(msgs)
    assert card["header"]["title"].startswith("✅ nightly finished")
    assert set(metric_rows(card)) == {"val_loss", "val_mae"}
    assert len(metric_rows(card)["val_loss"]["bottomLabel"]) == 4, "every epoch recorded, whatever is posted"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_keras_on_rank_1_posts_only_its_failure(space, monkeypatch):
    keras, np = _keras()
    from chat_magic.integrations.keras import ChatCallback

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model, (x, y) = _keras_model(keras), _xy(np)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[ChatCallback("ddp run")])
    assert chat_magic.flush(30) and space.messages() == [], "rank 1 posts no start, epoch or success"

    def broken(*args):
        raise OSError("disk full on rank 1")

    with pytest.raises(OSError, match="disk full"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[ChatCallback("ddp run"), keras.callbacks.LambdaCallback(on_epoch_end=broken)])
    card = final_card(settle(space))
    assert card["header"]["title"].startswith("❌ ddp run (rank 1 of 2) failed")
    assert rows(card)["Rank"] == "rank 1 of 2"


# -- Hugging Face Trainer -----------------------------------------------------------------------------


def _hf(tmp_path, callback, epochs=3, crash: bool = False):
    transformers = pytest.importorskip("transformers", reason=f"transformers {MISSING}")
    pytest.importorskip("accelerate", reason=f"accelerate {MISSING}")
    torch = pytest.importorskip("torch", reason=f"torch {MISSING}")
    transformers.set_seed(0)
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(config)  # from a config: nothing downloaded

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(n)
            self.ids = torch.randint(1, 32, (n, 8), generator=g)
            self.labels = (self.ids[:, 0] > 16).long()

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            if crash and i == 5:
                raise KeyError("sample 5 is missing")
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=epochs, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-3, seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(32), eval_dataset=Tokens(16), callbacks=[callback])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hf_trainer_with_eval_strategy_epoch_gives_eval_loss(space, tmp_path):
    pytest.importorskip("transformers", reason=f"transformers {MISSING}")
    from chat_magic.integrations.transformers import ChatCallback

    trainer = _hf(tmp_path, ChatCallback(progress_every=0))
    trainer.train()
    msgs = settle(space)

    assert "▶️ *BertForSequenceClassification training* started: BertForSequenceClassification, 3 epochs planned" in text_of(msgs)
    lines = epoch_lines(msgs, 3)
    assert [n for n, _ in lines] == ["1", "2", "3"]
    assert all(" · eval_loss " in m and " · loss " in m for _, m in lines), lines
    assert "runtime" not in text_of(msgs) and "per_second" not in text_of(msgs)
    card = final_card(msgs)
    assert rows(card)["Epochs"] == "3 of 3"
    metric = metric_rows(card)
    assert {"loss", "eval_loss"} <= set(metric)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3
    assert metric["eval_loss"]["text"].startswith(format_value(evals[-1]) + " · best " + format_value(min(evals)))
    assert SPARK.match(metric["eval_loss"]["bottomLabel"]) and len(metric["eval_loss"]["bottomLabel"]) == 3


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hf_trainer_crash_posts_the_failure_and_reaches_the_caller(space, tmp_path):
    pytest.importorskip("transformers", reason=f"transformers {MISSING}")
    from chat_magic.integrations.transformers import ChatCallback

    trainer = _hf(tmp_path, ChatCallback(on="error"), crash=True)
    with pytest.raises(KeyError, match="sample 5 is missing"):
        trainer.train()
    card = final_card(settle(space))
    assert card["header"]["title"].startswith("❌ BertForSequenceClassification training failed")
    assert "KeyError" in rows(card)["Error"]


# -- notebooks/training_callbacks.ipynb in a real kernel --------------------------------------------------

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "training_callbacks.ipynb"


def test_training_callbacks_notebook_is_committed_clean():
    raw, _code = committed_clean(NOTEBOOK)
    assert not re.search(r"https?://", raw), "no URL in the committed notebook"
    assert "key=" not in raw and "token=" not in raw


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_callbacks_notebook_posts_epochs_a_metrics_card_and_one_run_summary(space, monkeypatch, tmp_path):
    _lightning()
    from nbclient import NotebookClient

    monkeypatch.setenv("JPY_SESSION_NAME", str(NOTEBOOK))
    monkeypatch.setenv("CHAT_MAGIC_EXIT_TIMEOUT", "10")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stdout = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    final = re.search(r"final val_loss (\d\.\d{4})", stdout)
    assert final, stdout
    results = [o["data"]["text/plain"] for o in outputs if o.output_type == "execute_result"]
    assert results[-1] == "True", "chat_magic.flush(30): the callback's notices were delivered"
    saved = nbformat.writes(nb)
    assert KEY not in saved and TOKEN not in saved and space.url not in saved

    msgs = settle(space)  # the Run All summary was posted when the kernel shut down
    assert msgs[0]["text"].startswith("📓 *training_callbacks.ipynb*")
    text = text_of(msgs)
    assert "▶️ *regression* started: Regressor, 4 epochs planned" in text
    assert epoch_lines(msgs, 4) == [], "a 4-epoch run in seconds: the start line and the card (progress_every=300 s)"
    cards = [m["cardsV2"][0]["card"] for m in msgs if m.get("cardsV2")]
    assert [c["header"]["title"].split(" finished")[0] for c in cards] == ["✅ regression", "✅ Run of 6 cells"]
    metric = metric_rows(cards[0])
    assert metric["val_loss"]["text"].startswith(final.group(1)[:5]), (metric["val_loss"], final.group(1))
    assert SPARK.match(metric["val_loss"]["bottomLabel"]) and SPARK.match(metric["train_loss"]["bottomLabel"])
    summary = rows(cards[1])
    assert summary["Cells run"] == "6" and summary["Notebook"] == "training_callbacks.ipynb"
    assert all(re.match(r"\[\d+\] \S", c) for c in summary["Slowest cells"].split(" · ")), summary
    assert len(summary["Slowest cells"].split(" · ")) == 3


# -- two processes (Lightning DDP on the CPU) -------------------------------------------------------------

DDP_SCRIPT = '''
import os
import lightning as L, torch
from chat_magic.integrations.lightning import ChatCallback

class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    x = torch.rand(64, 1, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, 3 * x + 1), batch_size=8)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ChatCallback("ddp fit", progress_every=0)])
    trainer.fit(Regressor(), data)
    os.write(1, f"rank {trainer.global_rank} done\\n".encode())  # one write: the two ranks share the pipe
'''


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_lightning_ddp_on_two_processes_posts_once_from_global_rank_zero(space, tmp_path):
    _lightning()
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT, encoding="utf-8")
    env = {**os.environ, "CHAT_MAGIC_EXIT_TIMEOUT": "10", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0 done" in out.stdout and "rank 1 done" in out.stdout, "two processes trained"
    msgs = settle(space)
    text = text_of(msgs)
    assert text.count("started:") == 1 and "*ddp fit (rank 0 of 2)* started: Regressor, 3 epochs planned" in text
    assert [n for n, _ in epoch_lines(msgs, 3)] == ["1", "2", "3"], "epoch lines from rank 0 only"
    card = final_card(msgs)
    assert card["header"]["title"].startswith("✅ ddp fit (rank 0 of 2) finished")
    assert len(metric_rows(card)["train_loss"]["bottomLabel"]) == 3
