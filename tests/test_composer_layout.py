"""The composer's "Last sends" rows keep to the composer's width, without a browser (widget traits and its CSS).

The browser half (tests/test_browser.py) measures the rows in JupyterLab:
they were 939-1077 px wide inside a 760 px composer, their text cut at the
widget's edge mid-word, because the HTML widget's inner box (a flex item)
grew to the rows' full unwrapped width.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("ipywidgets")

from chat_magic.composer import Composer  # noqa: E402

pytestmark = pytest.mark.jupyter


def _rules(css: str) -> dict[str, str]:
    """selector -> declarations, for the composer's stylesheet (one selector list per rule)."""
    body = re.sub(r"</?style>", "", css)
    return {sel.strip(): decl for sel, decl in re.findall(r"([^{}]+)\{([^{}]*)\}", body)}


def _declares(rules: dict[str, str], selector: str, prop: str, value: str) -> bool:
    for sel, decl in rules.items():
        if selector in [s.strip() for s in sel.split(",")]:
            found = dict(d.split(":", 1) for d in decl.split(";") if ":" in d)
            if {k.strip(): v.strip() for k, v in found.items()}.get(prop) == value:
                return True
    return False


def test_history_widget_is_held_to_the_composer_width(outbox_home):
    c = Composer()
    layout = c.history.layout
    assert (layout.width, layout.max_width, layout.min_width) == ("100%", "100%", "0")
    assert "cm-history-box" in c.history._dom_classes
    rules = _rules(c.children[0].value)
    # the widget's inner box is a flex item: without min-width 0 it grows to the rows' unwrapped width
    assert _declares(rules, ".chat-magic-composer .cm-history-box > .widget-html-content", "min-width", "0")
    assert _declares(rules, ".chat-magic-composer .cm-row", "min-width", "0")
    # each part of a row ends in an ellipsis instead of running on
    assert _declares(rules, ".chat-magic-composer .cm-row span", "text-overflow", "ellipsis")
    assert _declares(rules, ".chat-magic-composer .cm-row span", "overflow", "hidden")


def test_a_long_row_keeps_its_full_text_in_the_tooltip(outbox_home):
    c = Composer()
    long_text = "a long message " * 30
    c._add_entry({"time": "12:00:00", "state": "failed", "detail": "the space refused it " * 10,
                  "to": "default", "where": "session thread", "text": long_text})
    row = c.history.value
    assert row.count('class="cm-row"') == 1
    shown = re.search(r'<span class="cm-x" title="([^"]*)">([^<]*)</span>', row)
    assert shown and len(shown.group(2)) < len(shown.group(1)) and shown.group(1).startswith("a long message")
