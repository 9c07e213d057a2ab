"""Metric history, sparklines and ``notify_when_done(...).log(...)`` against the emulator."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import assert_no_secret

import chat_magic
from chat_magic import metrics, notify_when_done
from chat_magic.metrics import BARS, MetricHistory, direction, format_value, sparkline
from chat_magic.report import Report

# -- pure pieces ------------------------------------------------------------------


@pytest.mark.parametrize("name, goal", [
    ("loss", "min"), ("val_loss", "min"), ("eval_loss", "min"), ("train_loss_epoch", "min"),
    ("val_mean_absolute_error", "min"), ("mae", "min"), ("val_mse", "min"), ("perplexity", "min"),
    ("valLoss", "min"), ("test/error-rate", "min"), ("sparse_categorical_crossentropy", "min"),
    ("acc", "max"), ("val_accuracy", "max"), ("f1", "max"), ("eval_f1", "max"), ("val_auc", "max"),
    ("precision", "max"), ("recall_macro", "max"), ("rouge1", "max"), ("valAcc", "max"),
    ("learning_rate", None), ("lr", None), ("grad_norm", None), ("epoch", None), ("throughput", None),
])
def test_direction_is_guessed_from_the_words_of_the_name(name, goal):
    assert direction(name) == goal


def test_sparkline_spans_the_eight_bars_and_keeps_the_shape():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == BARS
    assert sparkline([7, 6, 5, 4, 3, 2, 1, 0]) == BARS[::-1]
    assert sparkline([1.0, 0.5, 0.25, 0.25]) == "█▃▁▁"
    assert sparkline([3, 3, 3]) == "▄▄▄", "a flat course is a flat line"
    assert sparkline([]) == ""
    assert sparkline([1.0, math.nan, 0.0]) == "█×▁", "NaN shows as its own mark, the rest still scales"
    assert sparkline([math.inf]) == "×"


def test_a_long_history_is_averaged_into_the_width():
    values = [float(i % 10) for i in range(1000)] + [100.0] * 100
    assert sparkline(values, width=11) == "▁" * 10 + "█", "buckets of 100: ten of mean 4.5, one of 100"
    line = sparkline(values, width=20)
    assert len(line) == 20 and line[-1] == "█" and set(line[:-2]) == {"▁"}, line


def test_history_keeps_last_best_and_where_best_was_reached():
    h = MetricHistory()
    for epoch, (loss, acc) in enumerate([(0.9, 0.5), (0.4, 0.8), (0.5, 0.85), (0.45, 0.7)], start=1):
        assert h.record({"val_loss": loss, "val_acc": acc, "lr": 0.1 / epoch}, step=epoch) == []
    loss, acc, lr = h.summaries()
    assert (loss.last, loss.best, loss.best_step, loss.goal, loss.count) == (0.45, 0.4, 2, "min", 4)
    assert (acc.last, acc.best, acc.best_step, acc.goal) == (0.7, 0.85, 3, "max")
    assert lr.best is None and lr.goal is None and (lr.low, lr.high) == (0.025, 0.1)
    assert loss.spark == sparkline([0.9, 0.4, 0.5, 0.45])
    assert loss.describe() == "0.45 · best 0.4 (min, epoch 2)"
    assert lr.describe() == "0.025 · range 0.025–0.1"


def test_values_from_tensors_and_numpy_count_other_things_are_refused():
    np = pytest.importorskip("numpy", reason="numpy is not installed")
    h = MetricHistory()
    refused = h.record({"a": np.float32(0.5), "b": np.array([2.0]), "c": "high", "d": None, "e": True, "f": np.array([1.0, 2.0])})
    assert sorted(refused) == ["c", "d", "e", "f"]
    assert h.values("a") == [0.5] and h.values("b") == [2.0]


def test_format_value():
    assert format_value(0.312345) == "0.3123"
    assert format_value(12345.678) == "1.235e+04"
    assert format_value(3.0) == "3"
    assert format_value(float("nan")) == "nan"


def test_report_shows_metrics_in_text_and_card_and_stays_within_the_card_budget():
    h = MetricHistory()
    for i in range(4):
        h.record({"loss": 1 / (i + 1), "acc": i / 4})
    r = Report("fit", metrics=h.summaries(), details={f"k{i}": "v" for i in range(200)})
    text = r.text()
    assert re.search(r"`loss` 0\.25 · best 0\.25 \(min\)  █▃▂▁", text), text
    assert "`acc` 0.75 · best 0.75 (max)  ▁▃▆█" in text
    card = r.card()
    sections = card["card"]["sections"]
    (section,) = [s for s in sections if s.get("header") == "Metrics"]
    rows = {w["decoratedText"]["topLabel"]: w["decoratedText"] for w in section["widgets"]}
    assert rows["loss"]["bottomLabel"] == "█▃▂▁" and rows["loss"]["text"].startswith("0.25 · best 0.25")
    assert sum(len(s["widgets"]) for s in sections) <= 100, "metrics rows share the 100-widget budget"


def test_many_metrics_are_counted_not_listed_and_names_cannot_format():
    h = MetricHistory()
    h.record({f"m{i}": i for i in range(30)} | {"<users/all> `x`": 1.0})
    lines = metrics.text_lines(h.summaries())
    assert lines[-1] == "[… 11 more metrics]" and len(lines) == metrics.MAX_SHOWN + 1
    h2 = MetricHistory()
    h2.record({"<users/all> `x`": 1.0})
    (line,) = metrics.text_lines(h2.summaries())
    assert "<users/all>" not in line and line.count("`") == 2


# -- notify_when_done(...).log(...) over real HTTP ------------------------------------------


def _card(msgs):
    (card,) = [m["cardsV2"][0]["card"] for m in msgs if m.get("cardsV2")]
    return card


def _metric_rows(card):
    (section,) = [s for s in card["sections"] if s.get("header") == "Metrics"]
    return {w["decoratedText"]["topLabel"]: w["decoratedText"] for w in section["widgets"] if "decoratedText" in w}


def test_log_shows_last_values_best_values_and_sparklines_in_the_final_card(space, capsys):
    losses, accs = [0.9, 0.5, 0.35, 0.3], [0.4, 0.7, 0.8, 0.78]
    with notify_when_done("fit") as n:
        for loss, acc in zip(losses, accs, strict=True):
            n.log(loss=loss, acc=acc)
    assert chat_magic.flush(30)
    card = _card(space.messages())
    assert card["header"]["title"].startswith("✅ fit finished in ")
    rows = _metric_rows(card)
    assert rows["loss"]["text"] == "0.3 · best 0.3 (min)"
    assert rows["loss"]["bottomLabel"] == sparkline(losses) == "█▃▂▁"
    assert rows["acc"]["text"] == "0.78 · best 0.8 (max)"
    assert rows["acc"]["bottomLabel"] == sparkline(accs)
    assert capsys.readouterr().err == ""


def test_log_in_a_failing_decorated_function_shows_metrics_with_the_error_and_text_mode_has_them(space):
    @notify_when_done(cards=False)
    def train():
        for v in (3.0, 2.0, 1.0):
            chat_magic.notify.log(val_loss=v)
        raise ValueError("diverged")

    with pytest.raises(ValueError, match="diverged"):
        train()
    assert chat_magic.flush(30)
    (text,) = [m["text"] for m in space.messages() if "failed" in m.get("text", "")]
    assert "`val_loss` 1 · best 1 (min)  █▅▁" in text, text
    assert "ValueError: diverged" in text
    assert_no_secret(json.dumps(space.messages()))


def test_log_of_a_non_number_is_one_warning_line_and_the_block_goes_on(space, capsys):
    with notify_when_done("fit") as n:
        n.log(loss=0.5, note="fine")
        n.log(loss=0.4, note="still fine")
        after = True
    assert after
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "note of 'fit' not recorded" in err
    assert chat_magic.flush(30)
    assert set(_metric_rows(_card(space.messages()))) == {"loss"}


def test_log_outside_a_block_warns_and_records_nothing(space, capsys):
    n = notify_when_done("fit")
    n.log(loss=1.0)
    assert "outside" in capsys.readouterr().err
