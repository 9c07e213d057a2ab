"""chat_magic.chatsyntax: Chat syntax and card HTML rendered as safe HTML."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from chat_magic.chatsyntax import card_html, render, safe_url


class _Scan(HTMLParser):
    """Collects the tags and attributes a browser would build from an HTML string."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def tags(html: str) -> list[str]:
    return [t for t, _ in _Scan(html).tags]


def shown(html: str) -> str:
    """The text a reader sees (tags dropped, entities decoded)."""
    return "".join(_Scan(html).text)


def assert_inert(html: str) -> None:
    """No script, no event handler, no style, no dangerous link in ``html``."""
    for tag, attrs in _Scan(html).tags:
        assert tag in {"b", "i", "s", "u", "strike", "code", "pre", "br", "a", "span", "font"}, (tag, html)
        for name, value in attrs.items():
            assert not name.startswith("on"), (name, html)
            assert name in {"href", "target", "rel", "class", "title", "color"}, (name, html)
            if name == "href":
                assert re.match(r"(?i)^(https?://|mailto:)", value), (value, html)
                assert not re.search(r"[\s\"'<>]", value), (value, html)


# --------------------------------------------------------------------------- Chat syntax


@pytest.mark.parametrize(
    "text, expected",
    [
        ("*bold*", "<b>bold</b>"),
        ("_italic_", "<i>italic</i>"),
        ("~strike~", "<s>strike</s>"),
        ("a *b* _c_ ~d~ e", "a <b>b</b> <i>c</i> <s>d</s> e"),
        ("*_both_*", "<b><i>both</i></b>"),
        ("(*bold*).", "(<b>bold</b>)."),
        ("*two words*", "<b>two words</b>"),
    ],
)
def test_formatting(text, expected):
    assert render(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "**markdown**",  # Markdown's double markers show literally in Chat
        "snake_case_name",
        "2*3*4",
        "* spaced *",
        "*unclosed",
        "*across\nlines*",
    ],
)
def test_no_formatting_where_chat_has_none(text):
    out = render(text)
    assert not {"b", "i", "s"} & set(tags(out)), out
    assert shown(out) == text.replace("\n", "")


def test_nesting_is_balanced():
    out = render("*a _b* c_")
    assert out == "<b>a _b</b> c_"


def test_inline_code_is_literal():
    out = render("run `*not bold* <users/all> <https://x.com|x>` now")
    assert out.startswith("run <code")
    assert tags(out) == ["code"]
    assert shown(out) == "run *not bold* <users/all> <https://x.com|x> now"


def test_code_block_is_literal_and_keeps_lines():
    text = "before\n```\nx = *1*\n<script>alert(1)</script>\n  _y_\n```\nafter"
    out = render(text)
    assert tags(out) == ["br", "pre"]
    pre = re.search(r"<pre[^>]*>(.*)</pre>", out, re.S).group(1)
    assert shown(pre) == "x = *1*\n<script>alert(1)</script>\n  _y_"
    assert out.endswith("</pre>after")


def test_code_block_from_message_module():
    from chat_magic.message import code_block

    block = code_block("line <users/all>\n```evil``` *x*")
    out = render("output:\n" + block)
    assert tags(out) == ["br", "pre"]
    assert "mention" not in out
    assert "<b>" not in out


def test_line_breaks():
    assert render("a\nb\r\nc") == "a<br>b<br>c"


def test_links():
    out = render("see <https://example.com/a_b?x=1&y=2|the *docs*> now")
    (tag, attrs), = _Scan(out).tags
    assert tag == "a"
    assert attrs["href"] == "https://example.com/a_b?x=1&y=2"
    assert attrs["target"] == "_blank" and "noopener" in attrs["rel"]
    assert shown(out) == "see the *docs* now"


def test_bare_links_and_trailing_punctuation():
    out = render("go to https://example.com/x_y. or <https://e.org>")
    hrefs = [a["href"] for t, a in _Scan(out).tags if t == "a"]
    assert hrefs == ["https://example.com/x_y", "https://e.org"]
    assert shown(out) == "go to https://example.com/x_y. or https://e.org"


def test_mailto_link():
    out = render("<mailto:team@example.com|mail us>")
    assert _Scan(out).tags[0][1]["href"] == "mailto:team@example.com"


def test_mentions():
    out = render("<users/all> please, and <users/1234567>")
    chips = [a for t, a in _Scan(out).tags if t == "span"]
    assert [c["class"] for c in chips] == ["cm-mention", "cm-mention"]
    assert shown(out) == "@all please, and @1234567"


def test_neutralized_mention_is_not_a_chip():
    from chat_magic.message import neutralize

    out = render(neutralize("<users/all> <https://x.com|x>"))
    assert "span" not in tags(out) and "a" not in tags(out)
    assert "users/all" in shown(out)


@pytest.mark.parametrize(
    "text",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        '<https://x.com" onmouseover="alert(1)|hover>',
        "<https://x.com'onmouseover='alert(1)|hover>",
        "<javascript:alert(1)|click>",
        "<JaVaScRiPt:alert(1)|click>",
        "<java\tscript:alert(1)|click>",
        "< javascript:alert(1)|click>",
        "<data:text/html,<script>alert(1)</script>|x>",
        "<vbscript:msgbox(1)|x>",
        "<https://ok.com|<img src=x onerror=alert(1)>>",
        '<https://ok.com|x" onclick="alert(1)>',
        "*<img src=x onerror=alert(1)>*",
        "`</code><script>alert(1)</script>`",
        "```</pre><script>alert(1)</script>```",
        "javascript:alert(1)",
        "https://x.com/\"><script>alert(1)</script>",
        "\x00<script>\x00",
        "&lt;script&gt; &amp;",
    ],
)
def test_hostile_text_is_inert(text):
    out = render(text)
    assert_inert(out)
    assert "<script" not in out.lower() and "<img" not in out.lower()
    assert "javascript:" not in "".join(a.get("href", "") for _, a in _Scan(out).tags).lower()


def test_link_label_is_escaped():
    out = render("<https://ok.com|a &amp; b \"q\">")
    assert shown(out) == 'a &amp; b "q"'


def test_hostile_text_reads_as_typed():
    text = "<script>alert('x')</script> & <img src=x onerror=alert(1)> \"q\""
    assert shown(render(text)) == text


@pytest.mark.parametrize(
    "url, ok",
    [
        ("https://example.com", True),
        ("http://127.0.0.1:8080/x", True),
        ("mailto:a@b.c", True),
        ("javascript:alert(1)", False),
        ("https:alert(1)", False),
        ("https://", False),
        ("//example.com", False),
        ("ftp://example.com", False),
        ("https://exa mple.com", False),
        ('https://x.com/"', False),
        ("", False),
    ],
)
def test_safe_url(url, ok):
    assert (safe_url(url) is not None) is ok


# --------------------------------------------------------------------------- card HTML


def test_card_html_keeps_chat_subset():
    text = '<b>b</b> <i>i</i> <u>u</u> <s>s</s> <font color="#d93025">red</font> <code>c</code><br><pre>p</pre>'
    assert card_html(text) == text


def test_card_html_link_opens_in_new_tab():
    out = card_html('<a href="https://example.com/?a=1&amp;b=2">docs</a>')
    (tag, attrs), = _Scan(out).tags
    assert attrs["href"] == "https://example.com/?a=1&b=2"
    assert attrs["target"] == "_blank" and "noopener" in attrs["rel"]


@pytest.mark.parametrize(
    "text",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        '<a href="javascript:alert(1)">x</a>',
        '<a href=" javascript:alert(1)">x</a>',
        '<a href="https://ok.com" onclick="alert(1)">x</a>',
        '<b onmouseover="alert(1)">x</b>',
        '<font color="red" style="background:url(javascript:alert(1))">x</font>',
        '<font color="red;background:url(x)">x</font>',
        "<svg><script>alert(1)</script></svg>",
        "<iframe src=https://evil.com></iframe>",
        "<style>body{display:none}</style>",
        "<!--<script>alert(1)</script>-->",
        "<b>unclosed <i>nested",
        "</b></pre>stray closers",
        "<<b>>",
        "<b",
        "<font color='x\" onmouseover=\"alert(1)'>x</font>",
        "<a href='https://ok.com/\" onclick=\"alert(1)'>x</a>",
    ],
)
def test_card_html_hostile_is_inert(text):
    out = card_html(text)
    assert_inert(out)
    low = out.lower()
    assert "<script" not in low and "<img" not in low and "<iframe" not in low and "<style" not in low


def test_card_html_closes_what_it_opens():
    out = card_html("<b>bold <i>both")
    assert out == "<b>bold <i>both</i></b>"
    assert card_html("</b>x") == "&lt;/b&gt;x"


def test_card_html_shows_disallowed_tags_literally():
    out = card_html("<script>alert(1)</script><b>ok</b>")
    assert shown(out) == "<script>alert(1)</script>ok"


def test_report_card_text_renders():
    from chat_magic.report import FAILED, Report

    card = Report("train.py", status=FAILED, error="ValueError: <b>bad</b>", output="<img src=x onerror=alert(1)>").card()
    widgets = [w for s in card["card"]["sections"] for w in s["widgets"]]
    error = card_html(widgets[0]["decoratedText"]["text"])
    assert tags(error) == ["font"]
    assert shown(error) == "ValueError: <b>bad</b>"
    out = card_html(widgets[-1]["textParagraph"]["text"])
    assert tags(out) == ["pre"] and shown(out) == "<img src=x onerror=alert(1)>"


# --------------------------------------------------------------------------- the emulator's web view (HTML only; the browser test runs it)


def _msg(text=None, *, space="AAAA", thread="T1", key=None, request_id="r1", cards=None, t="2026-01-02T03:04:05.000000Z", n=1):
    m = {"name": f"spaces/{space}/messages/M{n}.{thread}", "createTime": t,
         "thread": {"name": f"spaces/{space}/threads/{thread}", **({"threadKey": key} if key else {})},
         "space": {"name": f"spaces/{space}"}, "_emu": {"space": space, "requestId": request_id}}
    if text is not None:
        m["text"] = text
    if cards is not None:
        m["cardsV2"] = cards
    return m


def test_web_view_groups_threads_newest_last_and_shows_meta():
    from chat_magic.emulator.webview import render_page

    msgs = [_msg("first", thread="A", key="k-a", request_id="cm-1", n=1),
            _msg("other thread", thread="B", request_id="cm-2", n=2),
            _msg("reply to A", thread="A", key="k-a", request_id="cm-3", n=3)]
    page = render_page({"messages": msgs, "stats": {"messages": 3, "requests": 4, "rejected": 1}})
    # thread A had the last message: it comes last, its reply inside it
    assert page.index("other thread") < page.index("first") < page.index("reply to A")
    assert page.count('class="thread"') == 2 and "1 reply" in page
    assert "requestId <span class=\"mono\">cm-3</span>" in page and "key <span class=\"mono\">k-a</span>" in page
    assert "3 messages · 4 requests · 1 rejected" in page


def test_web_view_escapes_everything_from_a_request():
    from chat_magic.emulator.webview import render_page

    evil = "<img src=x onerror=alert(1)>"
    card = {"cardId": "c", "card": {
        "header": {"title": f"<script>alert(1)</script>{evil}", "subtitle": evil},
        "sections": [{"header": evil, "widgets": [
            {"textParagraph": {"text": f"<b>ok</b>{evil}<script>alert(2)</script>"}},
            {"decoratedText": {"topLabel": evil, "text": f'<font color="red">{evil}</font>'}},
            {"buttonList": {"buttons": [{"text": evil, "onClick": {"openLink": {"url": "javascript:alert(3)"}}},
                                        {"text": "docs", "onClick": {"openLink": {"url": 'https://ok.com/"><script>'}}}]}},
            {"image": {"imageUrl": "https://example.com/x.png", "altText": evil}},
        ]}]}}
    msgs = [_msg(f"<script>alert(4)</script>{evil}", key='"><script>alert(5)</script>', request_id=evil, cards=[card])]
    msgs[0]["name"] = f"spaces/AAAA/messages/{evil}"
    msgs[0]["fallbackText"] = evil
    page = render_page({"messages": msgs, "stats": {"requests": evil}, "base_url": evil}, space="<script>x</script>")
    page_all = render_page({"messages": msgs, "stats": {}, "base_url": ""})
    for html_ in (page, page_all):
        scan = _Scan(html_)
        # the one image is the card's own URL (the web view shows figures, issue 18); the evil alt text is inert
        assert [(t, a.get("src")) for t, a in scan.tags if t in ("img", "iframe")] in ([], [("img", "https://example.com/x.png")])
        assert sum(1 for t, _ in scan.tags if t == "script") == 1  # the page's own
        for tag, attrs in scan.tags:
            assert not any(a.startswith("on") for a in attrs), (tag, attrs)
            assert "javascript:" not in (attrs.get("href") or "").lower()
    assert "<b>ok</b>" in page_all and "<font color=\"red\">" in page_all
    assert "&lt;img src=x onerror=alert(1)&gt;" in page_all
    assert "No messages in spaces/&lt;script&gt;x&lt;/script&gt;" in page


def test_web_view_one_space_and_empty_state():
    from chat_magic.emulator.webview import render_page

    msgs = [_msg("in A", space="AAAA"), _msg("in B", space="BBBB", n=2)]
    only_b = render_page({"messages": msgs}, space="spaces/BBBB")
    assert "in B" in only_b and "in A" not in only_b.split("<main")[1]
    assert 'href="/?space=AAAA"' in only_b  # the sidebar still lists every space
    assert "No messages yet" in render_page({"messages": []})
    assert "&lt;b&gt;" in render_page({"messages": [{"text": "<b>", "thread": {"name": "t"}}]})
