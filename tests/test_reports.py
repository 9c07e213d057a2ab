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

    sources = ["%chat_autonotify --run-all --quiet 0.5", "# Load\nx = 1", "# Train\nraise ValueError('diverged')",
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
    ip.run_cell("%chat_autonotify --run-all --quiet 0.5")
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
