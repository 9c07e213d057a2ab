"""Reports that tell the truth (issue 19): sparklines, receipt callbacks, Run All totals.

Delivery runs against the emulator over real HTTP on loopback; every payload
the space accepts is validated with the official proto (the ``space`` fixtures).
"""

from __future__ import annotations

import math
import threading
from collections import Counter

import pytest
from conftest import wait_until

import chat_magic
from chat_magic import metrics

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
