"""Render Google Chat's two text formats as safe HTML.

- :func:`render` turns message ``text`` (Chat syntax) into HTML the way Chat
  shows it: ``*bold*``, ``_italic_``, ``~strike~``, ```` `code` ````,
  ```` ```code blocks``` ````, ``<https://example.com|label>`` links, bare
  ``https://`` links, ``<users/all>`` / ``<users/ID>`` mentions and line breaks.
- :func:`card_html` sanitizes card text, which is Chat's small HTML subset
  (``<b> <i> <u> <s> <font color> <a href> <br> <code> <pre>``).

Both escape everything else: whatever a message says, the result can carry no
script, event handler, style or ``javascript:`` link. Used by the composer's
live preview and by the emulator's web view. Standard library only.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

__all__ = ["render", "card_html", "safe_url", "link"]

_SCHEMES = ("http", "https", "mailto")
_BAD_URL_CHARS = re.compile(r"[\s\"'<>\\`\x00-\x1f\x7f]")

# Tokens whose inside is never formatted, scanned left to right; the first
# alternative that matches at a position wins.
_ATOMS = re.compile(
    r"(?P<block>```(?P<block_body>.*?)```\n?)"  # code block (may span lines), with its line end
    r"|(?P<code>`(?P<code_body>[^`\n]+)`)"  # inline code
    r"|(?P<angle><(?P<angle_body>[^<>\n]+)>)"  # <url|label>, <url>, <users/ID>
    r"|(?P<bare>\b(?:https?://)[^\s<>\"'`]+)",  # a bare link
    re.DOTALL | re.IGNORECASE,
)
# *bold*, _italic_, ~strike~: the marker sits against the word it formats, is
# not inside a word, and the span stays on one line. The leftmost opening
# marker wins and its inside is rendered again, so nesting comes out balanced.
# A doubled marker (Markdown's **bold**) is shown as typed, as in Chat.
_FORMAT = re.compile(
    "|".join(
        rf"(?<![\w{m}])(?P<{tag}>{re.escape(m)})(?=[^\s{m}])(?P<{tag}_body>[^\n]*?[^\s{m}]){re.escape(m)}(?![\w{m}])"
        for m, tag in (("*", "b"), ("_", "i"), ("~", "s"))
    )
)
_PLACEHOLDER = re.compile("\x00(\\d+)\x00")
_MENTION = re.compile(r"users/([A-Za-z0-9._@-]{1,100})")


def safe_url(url: str) -> str | None:
    """``url`` if it is an ``http``, ``https`` or ``mailto`` URL a link may point at, else ``None``."""
    url = url.strip()
    if not url or _BAD_URL_CHARS.search(url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES or not url.lower().startswith(scheme + ":"):
        return None
    if scheme in ("http", "https") and not (url[len(scheme) + 1:].startswith("//") and parts.hostname):
        return None
    if scheme == "mailto" and not parts.path:
        return None
    return url


def link(url: str, label_html: str) -> str:
    """An ``<a>`` that opens in a new tab (``url`` must have passed :func:`safe_url`)."""
    return f'<a href="{html.escape(url, quote=True)}" target="_blank" rel="noopener noreferrer">{label_html}</a>'


def _mention(who: str) -> str:
    label = "@all" if who == "all" else f"@{who}"
    return f'<span class="cm-mention" title="users/{html.escape(who)}">{html.escape(label)}</span>'


def _angle(body: str) -> str | None:
    """HTML for ``<body>``, or ``None`` when Chat would show it literally."""
    m = _MENTION.fullmatch(body)
    if m:
        return _mention(m.group(1))
    url, sep, label = body.partition("|")
    target = safe_url(url)
    if target is None or url != url.strip():
        return None
    if sep and not label.strip():
        return None
    return link(target, html.escape(label if sep else url))


def _bare(url: str) -> tuple[str, str]:
    """(link HTML, trailing text): punctuation after a link is not part of it."""
    trail = ""
    while url and url[-1] in ".,;:!?)*_~]}":
        if url[-1] == ")" and url.count("(") >= url.count(")"):
            break
        trail = url[-1] + trail
        url = url[:-1]
    target = safe_url(url)
    if target is None:
        return html.escape(url + trail), ""
    return link(target, html.escape(url)), trail


def _format(escaped: str) -> str:
    def sub(m: re.Match) -> str:
        tag = next(t for t in ("b", "i", "s") if m.group(t) is not None)
        return f"<{tag}>{_format(m.group(tag + '_body'))}</{tag}>"

    return _FORMAT.sub(sub, escaped)


def render(text: str) -> str:
    """Chat-syntax ``text`` as HTML, escaped everywhere but the formatting Chat applies."""
    text = str(text).replace("\r\n", "\n").replace("\x00", "\ufffd")
    atoms: list[str] = []

    def keep(fragment: str) -> str:
        atoms.append(fragment)
        return f"\x00{len(atoms) - 1}\x00"

    def atom(m: re.Match) -> str:
        if m.group("block") is not None:
            body = m.group("block_body")
            if body.startswith("\n"):
                body = body[1:]
            if body.endswith("\n"):
                body = body[:-1]
            return keep(f'<pre class="cm-code">{html.escape(body)}</pre>')
        if m.group("code") is not None:
            return keep(f'<code class="cm-code">{html.escape(m.group("code_body"))}</code>')
        if m.group("angle") is not None:
            out = _angle(m.group("angle_body"))
            return keep(out) if out is not None else keep(html.escape(m.group("angle")))
        out, trail = _bare(m.group("bare"))
        return keep(out) + trail

    marked = _ATOMS.sub(atom, text)
    out = _format(html.escape(marked, quote=True))
    out = out.replace("\n", "<br>")
    return _PLACEHOLDER.sub(lambda m: atoms[int(m.group(1))], out)


# --------------------------------------------------------------------------- card text

_CARD_TAGS = frozenset({"b", "i", "u", "s", "strike", "font", "a", "br", "code", "pre"})
_VOID = frozenset({"br"})
_COLOR = re.compile(r"#[0-9A-Fa-f]{3}(?:[0-9A-Fa-f]{3})?(?:[0-9A-Fa-f]{2})?|[A-Za-z]{3,20}")


class _CardSanitizer(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.open: list[str] = []

    def _literal(self) -> None:
        self.out.append(html.escape(self.get_starttag_text() or ""))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _CARD_TAGS:
            self._literal()
            return
        if tag in _VOID:
            self.out.append("<br>")
            return
        a = dict(attrs)
        if tag == "font":
            color = (a.get("color") or "").strip()
            attr = f' color="{html.escape(color)}"' if _COLOR.fullmatch(color) else ""
            self.out.append(f"<font{attr}>")
        elif tag == "a":
            url = safe_url(a.get("href") or "")
            if url is None:
                self.out.append("<a>")
            else:
                self.out.append(link(url, "")[: -len("</a>")])
        else:
            self.out.append(f"<{tag}>")
        self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            self.out.append("<br>")
        else:
            self._literal()

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        if tag not in _CARD_TAGS or tag not in self.open:
            self.out.append(html.escape(f"</{tag}>"))
            return
        while self.open:  # close what was left open inside it
            t = self.open.pop()
            self.out.append(f"</{t}>")
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        self.out.append(html.escape(data))

    def handle_comment(self, data: str) -> None:
        self.out.append(html.escape(f"<!--{data}-->"))

    def handle_decl(self, decl: str) -> None:
        self.out.append(html.escape(f"<!{decl}>"))

    def handle_pi(self, data: str) -> None:
        self.out.append(html.escape(f"<?{data}>"))

    def unknown_decl(self, data: str) -> None:
        self.out.append(html.escape(f"<![{data}]>"))

    def result(self) -> str:
        self.close()
        rest = self.rawdata
        if rest:  # an unfinished tag at the end: show it
            self.out.append(html.escape(rest))
            self.rawdata = ""
        while self.open:
            self.out.append(f"</{self.open.pop()}>")
        return "".join(self.out)


def card_html(text: str) -> str:
    """Card text (Chat's HTML subset) as safe HTML: allowed tags kept, the rest shown as text.

    Kept: ``<b> <i> <u> <s> <strike> <code> <pre> <br>``, ``<font color>`` with a
    plain colour, ``<a href>`` with an http(s)/mailto URL (opening in a new
    tab). Any other tag, attribute, comment or script is escaped and shows
    literally; tags left open are closed.
    """
    parser = _CardSanitizer()
    parser.feed(str(text))
    return parser.result()
