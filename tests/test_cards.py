"""Completion cards stay within Google Chat's card rules for any report.

Every report is rendered the way chat_magic sends it (``Report.payload_kwargs``
then ``message.build_payloads``) and checked: valid against the official
proto, a header title, at least one widget per section, at most 100 widgets,
at most 32,000 bytes, text within 4,096 characters, and untrusted text
HTML-escaped in the card and unable to mention anyone in the text.
"""

from __future__ import annotations

import html
import json
import random
import re

import pytest
from conftest import validate_message

from chat_magic.message import MAX_BYTES, MAX_TEXT, build_payloads, payload_size
from chat_magic.report import FAILED, INTERRUPTED, OK, PROGRESS, STARTED, Report

STATUSES = (OK, FAILED, INTERRUPTED, STARTED, PROGRESS)


def widget_texts(card: dict) -> list[str]:
    out = []
    for sec in card["card"]["sections"]:
        for w in sec["widgets"]:
            for kind in ("textParagraph", "decoratedText"):
                if kind in w:
                    out.append(w[kind].get("text", ""))
                    out.append(w[kind].get("topLabel", ""))
    return out


def check_payload(report: Report, *, cards: bool = True, thread_key: str = "t" * 120) -> dict:
    """Render ``report`` as sent and assert every card rule; return the payload."""
    kwargs = report.payload_kwargs(cards=cards)
    payloads = build_payloads(kwargs.get("text"), cards=kwargs.get("cards"), fallback_text=kwargs.get("fallback_text"),
                              thread_key=thread_key, truncate=True)
    assert len(payloads) == 1
    p = payloads[0]
    validate_message(p)
    # the outbox stores (and the worker sends) the compact UTF-8 JSON that payload_size measures
    assert payload_size(p) == len(json.dumps(p, ensure_ascii=False, separators=(",", ":")).encode())
    assert payload_size(p) <= MAX_BYTES
    assert len(p.get("text", "")) <= MAX_TEXT
    if cards:
        assert len(p["cardsV2"]) == 1
        card = p["cardsV2"][0]
        assert card["cardId"]
        header = card["card"]["header"]
        assert header["title"].strip(), "a card header needs a title"
        sections = card["card"]["sections"]
        assert sections
        total = 0
        for sec in sections:
            assert len(sec["widgets"]) >= 1, "a section needs a widget"
            total += len(sec["widgets"])
        assert total <= 100, f"{total} widgets"
        assert p.get("fallbackText", "").strip(), "a card needs a text fallback"
    else:
        assert "cardsV2" not in p and p["text"].strip()
    return p


def hostile_pieces() -> list[str]:
    return [
        "<script>alert('x')</script>",
        "</pre><b>bold?</b><a href='https://evil.example'>click</a>",
        "<users/all> ping everyone <https://evil.example|innocent>",
        "``` closes the block? ```",
        "emoji 😀🎉 CJK 漢字 RTL \u202e gnp.exe combining e\u0301",
        "\x1b[31mred\x1b[0m and \r progress \r100%",
        "tab\tand NUL\x00 and bell\x07",
        "&amp; &lt; already-escaped",
    ]


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("cards", [True, False])
def test_every_status_fits_and_validates(status, cards):
    r = Report("train.py", status=status, duration=3725.4, output="loss 0.1\n" * 20, error="ValueError: bad" if status == FAILED else "",
               traceback="Traceback (most recent call last):\n  File x\nValueError: bad" if status == FAILED else "",
               details={"Host": "gpu-01", "Script": "train.py", "Exit code": "1"})
    p = check_payload(r, cards=cards)
    if cards:
        assert "train.py" in p["cardsV2"][0]["card"]["header"]["title"]
        labels = [w["decoratedText"]["topLabel"] for w in p["cardsV2"][0]["card"]["sections"][0]["widgets"] if "decoratedText" in w]
        for k in ("Host", "Script", "Exit code"):
            assert k in labels
        if status != STARTED:
            assert "Duration" in labels


@pytest.mark.parametrize("size", [10_000, 200_000, 2_000_000])
@pytest.mark.parametrize("lines", [True, False])
def test_huge_output_is_cut_to_its_tail(size, lines):
    unit = "line of output ✓ number\n" if lines else "x" * 50 + "漢"
    out = (unit * (size // len(unit) + 1))[:size] + "THE-END"
    r = Report("big", status=FAILED, duration=1, output=out, traceback="Traceback\n" + "  frame\n" * 5000 + "RuntimeError: boom",
               error="RuntimeError: boom")
    p = check_payload(r)
    texts = "\n".join(widget_texts(p["cardsV2"][0]))
    assert "THE-END" in texts, "the tail of the output is what matters"
    assert "RuntimeError: boom" in texts
    assert "cut]" in texts, "a cut says so"
    check_payload(r, cards=False)


def test_hostile_text_is_escaped_in_cards_and_inert_in_text():
    for piece in hostile_pieces():
        r = Report(f"label {piece}", status=FAILED, duration=2, output=f"before\n{piece}\nafter", error=f"Err: {piece}",
                   traceback=f"tb {piece}", details={"Host": piece, piece[:20]: piece}, mention=None)
        p = check_payload(r)
        for t in widget_texts(p["cardsV2"][0]):
            # only our own markup survives: <pre>, </pre>, <font ...>, </font>
            stripped = re.sub(r"</?pre>|<font color=\"#[0-9a-f]{6}\">|</font>", "", t)
            assert "<" not in stripped and ">" not in stripped, t
        text_p = check_payload(r, cards=False)
        assert "<users/all>" not in text_p["text"]
        assert "<https://evil.example|" not in text_p["text"]
        assert "<script>" not in p.get("text", "")


def test_output_round_trips_through_html_escaping():
    sample = "a < b && c > d\n<tag attr=\"v\">'q'</tag>\n"
    p = check_payload(Report("r", output=sample))
    pre = [t for t in widget_texts(p["cardsV2"][0]) if t.startswith("<pre>")][0]
    assert html.unescape(pre[len("<pre>"):-len("</pre>")]) == sample


@pytest.mark.parametrize("n", [0, 1, 50, 99, 100, 150, 1000])
def test_many_details_stay_under_100_widgets(n):
    details = {f"key {i}": f"value {i} " + "v" * (i % 7) for i in range(n)}
    r = Report("many", status=FAILED, duration=5, output="out", traceback="tb", error="E: x", details=details)
    p = check_payload(r)
    texts = "\n".join(widget_texts(p["cardsV2"][0]))
    if n:
        assert "key 0" in texts, "the first details are shown"
    if n > 100:
        assert "more" in texts, "details left out are counted"
    check_payload(r, cards=False)


def test_huge_details_title_and_error_fit():
    big = "é" * 100_000
    r = Report(big, status=FAILED, duration=1, output=big, error="E: " + big, traceback=big,
               details={"Host": big, big: big, "Notebook": "n.ipynb"}, mention="all")
    p = check_payload(r)
    assert p["text"].startswith("<users/all>")
    check_payload(r, cards=False)


def test_random_reports_always_fit():
    rng = random.Random(1234)
    alphabet = "abc <>&\"'`*_~\n\t😀漢\u200b\\/" + "x" * 10
    pieces = hostile_pieces()

    def rand_text(max_len):
        n = rng.choice([0, 1, 10, 100, 1000, max_len])
        s = "".join(rng.choice(alphabet) for _ in range(min(n, 3000)))
        if n > 3000:
            s = s * (n // 3000)
        if rng.random() < 0.3:
            s += rng.choice(pieces)
        return s

    for _ in range(120):
        r = Report(
            rand_text(5000) or "t",
            status=rng.choice(STATUSES),
            duration=rng.choice([None, 0.0004, 12.5, 99999.0]),
            output=rand_text(100_000),
            error=rand_text(2000),
            traceback=rand_text(50_000),
            details={rand_text(50) or "k": rand_text(3000) for _ in range(rng.choice([0, 2, 5, 120]))},
            mention=rng.choice([None, "all", "123456789"]),
            max_lines=rng.choice([None, 0, 5, 40]),
        )
        check_payload(r, cards=True)
        check_payload(r, cards=False)
