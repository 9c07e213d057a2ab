"""Message payloads: Chat-syntax escaping, code blocks, splitting and truncation.

Google Chat rejects ``text`` over 4,096 characters and a request body over
32,000 bytes. Everything here produces payloads that fit, so the server never
sees an over-limit message.

Text that did not come from the user's explicit wish (captured output,
tracebacks) goes through :func:`neutralize` or :func:`code_block`: it cannot
mention anyone (``<users/all>``), turn into a link, or close the code block it
sits in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import MessageError

if TYPE_CHECKING:  # pragma: no cover
    from .webhook import Webhook

__all__ = [
    "MAX_BYTES", "MAX_TEXT", "SEPARATOR", "build_payloads", "code_block", "cut_note", "merge_texts", "neutralize",
    "payload_size", "split_text", "strip_ansi", "tail", "truncate_text", "valid_unicode"
]

MAX_TEXT = 4096
MAX_BYTES = 32_000
ZWSP = "\u200b"  # zero-width space: breaks a token without changing what a reader sees
FENCE = "```"
SEPARATOR = "\n\n"
MAX_PARTS = 25  # a longer text would hold the space's thread for minutes at 1 message/s

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def strip_ansi(text: str) -> str:
    """Remove ANSI colour and cursor codes (and other C0 control characters but tab/newline)."""
    text = _ANSI.sub("", text)
    text = text.replace("\r\n", "\n")
    # a bare carriage return (progress bars) keeps only what was drawn last on that line
    if "\r" in text:
        text = "\n".join(line.rsplit("\r", 1)[-1] if line.rstrip("\r") else line.replace("\r", "") for line in text.split("\n"))
    return _CONTROL.sub("", text)


def neutralize(text: str) -> str:
    """Make untrusted text inert in Chat syntax.

    ``<users/all>``, ``<users/123>`` and ``<https://x|label>`` are broken up by
    a zero-width space after ``<`` so they show as typed but neither ping nor
    link; runs of backticks are broken up so they cannot open or close a code
    block.
    """
    text = text.replace("<", "<" + ZWSP)
    return re.sub(r"`(?=`)", "`" + ZWSP, text)


def code_block(text: str) -> str:
    """Wrap untrusted text in a code block it cannot escape from."""
    body = neutralize(strip_ansi(text)).rstrip("\n")
    return f"{FENCE}\n{body}\n{FENCE}" if body else ""


def tail(text: str, max_chars: int, max_lines: int | None = None) -> tuple[str, int]:
    """Keep the end of ``text`` within ``max_chars`` and ``max_lines``.

    Returns the kept text and how many characters were cut from the front.
    """
    kept = text
    if max_lines is not None and max_lines >= 0:
        lines = kept.splitlines(keepends=True)
        if len(lines) > max_lines:
            kept = "".join(lines[len(lines) - max_lines:]) if max_lines else ""
    if len(kept) > max_chars:
        kept = kept[len(kept) - max_chars:]
        nl = kept.find("\n")
        if 0 <= nl < len(kept) - 1:  # start on a whole line when one is there
            kept = kept[nl + 1:]
    return kept, len(text) - len(kept)


def cut_note(cut: int, unit: str = "characters") -> str:
    return f"[… {cut:,} {unit} cut]"


def truncate_text(text: str, limit: int = MAX_TEXT) -> str:
    """Cut ``text`` to ``limit`` characters with a marker saying how much was cut.

    A code block left open by the cut is closed.
    """
    if len(text) <= limit:
        return text
    reserve = len("\n" + cut_note(len(text))) + len(FENCE) + 1
    head = text[: limit - reserve]
    closing = "\n" + FENCE if _open_fence(head) else ""
    return f"{head}{closing}\n{cut_note(len(text) - len(head))}"


def _open_fence(text: str) -> bool:
    """Whether ``text`` ends inside a ``` code block."""
    return text.count(FENCE) % 2 == 1


def split_text(text: str, limit: int = MAX_TEXT) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` characters, in order.

    Splits at line ends where it can (else at spaces, else anywhere). A code
    block open at a split is closed at the end of one part and reopened at the
    start of the next, so each part renders on its own.
    """
    if limit < 16:
        raise ValueError("limit too small")
    if len(text) <= limit:
        return [text]
    parts: list[str] = []
    pos, end = 0, len(text)  # an index, not a shrinking copy: linear in len(text)
    reopen = False
    while pos < end:
        prefix = FENCE + "\n" if reopen else ""
        room = limit - len(prefix)
        if end - pos <= room:
            parts.append(prefix + text[pos:])
            break
        # leave room to close a block we might end inside
        window = text[pos: pos + room - len(FENCE) - 1]
        cut = window.rfind("\n") + 1
        if cut < len(window) // 2:
            sp = window.rfind(" ") + 1
            cut = sp if sp > len(window) // 2 else len(window)
        # never cut inside a fence marker
        while 0 < cut < end - pos and text[pos + cut - 1] == "`" and text[pos + cut] == "`":
            cut -= 1
        if cut == 0:
            cut = len(window)
        chunk = prefix + text[pos: pos + cut]
        pos += cut
        inside = _open_fence(chunk)
        if inside:
            chunk = chunk.rstrip("\n") + "\n" + FENCE
        parts.append(chunk)
        reopen = inside
    return parts


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD.

    Output decoded with ``errors="surrogateescape"`` (file names, some
    terminals) keeps undecodable bytes as lone surrogates, which UTF-8, JSON
    on the wire and the outbox cannot carry. They show as ``\ufffd``, as
    ``errors="replace"`` would have shown them.
    """
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


def payload_size(payload: dict[str, Any]) -> int:
    # surrogatepass: a lone surrogate counts as the 3 bytes of the U+FFFD it will be sent as
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))


def _scrub_tree(value: Any, scrub: Callable[[str], str]) -> Any:
    """Every string in a JSON-like tree (a card) scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrub_tree(v, scrub) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_tree(v, scrub) for k, v in value.items()}
    return value


def _fit_texts(texts: list[str], envelope: dict[str, Any], *, truncate: bool) -> list[str]:
    """Each text re-cut until its whole message (``envelope`` included) is within :data:`MAX_BYTES`.

    4,096 characters of emoji plus a long thread key pass the character limit
    and not the byte limit: the real envelope decides.
    """
    out: list[str] = []
    for t in texts:
        size = payload_size({"text": t, **envelope})
        if size <= MAX_BYTES:
            out.append(t)
            continue
        room = MAX_BYTES - payload_size({"text": "", **envelope})
        if room < 64:
            raise MessageError("the thread key leaves no room for text in a 32,000-byte message: use a shorter thread key")
        limit = max(16, len(t) * room // size - 16)
        smaller = [truncate_text(t, limit)] if truncate else split_text(t, limit)
        out.extend(_fit_texts(smaller, envelope, truncate=truncate))
    return out


def build_payloads(
    text: str | None,
    *,
    cards: list[dict[str, Any]] | None = None,
    thread_key: str | None = None,
    truncate: bool = False,
    fallback_text: str | None = None,
    webhook: Webhook | None = None,
) -> list[dict[str, Any]]:
    """The Message bodies to POST for one ``send``: one, or several in order when split.

    Built once, at one boundary, with the real envelope (the thread key):
    ``webhook``'s own key and token are scrubbed from the whole text, the
    fallback and every string of the cards *before* anything is cut, and every
    body is checked against both limits (4,096 characters, 32,000 bytes).
    ``cards`` that can shrink themselves (a ``refit(envelope)`` attribute, as
    :meth:`Report.payload_kwargs` gives) are rebuilt smaller when the envelope
    leaves less room than they assumed.

    ``thread_key`` comes checked (:func:`chat_magic.rules.validate_thread_key`,
    applied by :func:`chat_magic.delivery.send`, where every front end passes).

    Raises :class:`MessageError` for an empty message or one that cannot fit.
    """
    scrub: Callable[[str], str] = webhook.scrub if webhook is not None else (lambda s: s)
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    # terminal colour codes and control characters mean nothing in Chat
    text = "" if text is None else scrub(strip_ansi(valid_unicode(str(text))))
    if isinstance(thread_key, str):
        thread_key = valid_unicode(thread_key)
    if fallback_text:
        fallback_text = scrub(valid_unicode(str(fallback_text)))
    refit = getattr(cards, "refit", None)
    if cards:
        cards = _clean_cards(cards, scrub)
    if not text.strip() and not cards:
        raise MessageError("the message is empty: give some text or a card")
    envelope: dict[str, Any] = {"thread": {"threadKey": thread_key}} if thread_key else {}

    if cards:
        payload: dict[str, Any] = {"cardsV2": cards}
        if text.strip():
            payload["text"] = truncate_text(text)
        if fallback_text:
            payload["fallbackText"] = truncate_text(fallback_text, 1000)
        payload.update(envelope)
        if payload_size(payload) > MAX_BYTES and callable(refit):
            payload["cardsV2"] = _clean_cards(refit({k: v for k, v in payload.items() if k != "cardsV2"}), scrub)
        if payload_size(payload) > MAX_BYTES:
            raise MessageError(f"the cards are {payload_size(payload):,} bytes; a Chat message is at most {MAX_BYTES:,}: shorten the card text")
        return [payload]

    # (the length check first spares splitting a text that cannot fit anyway)
    texts = [truncate_text(text)] if truncate else [] if len(text) > MAX_PARTS * MAX_TEXT else split_text(text)
    if texts:
        texts = _fit_texts(texts, envelope, truncate=truncate)
    if not texts or len(texts) > MAX_PARTS:
        raise MessageError(
            f"the text is {len(text):,} characters, more than {MAX_PARTS} messages of up to {MAX_TEXT:,}: "
            "pass truncate=True (--truncate) to send the start with a note, or send less"
        )
    return [{"text": t, **envelope} for t in texts]


def _clean_cards(cards: list[dict[str, Any]], scrub: Callable[[str], str]) -> list[dict[str, Any]]:
    raw = json.dumps(cards, ensure_ascii=False)
    if valid_unicode(raw) is not raw:
        cards = json.loads(valid_unicode(raw))
    return _scrub_tree(list(cards), scrub)


def merge_texts(texts: list[str]) -> str:
    """Join several short messages into one, in order, separated by a blank line."""
    return SEPARATOR.join(t.strip("\n") for t in texts)
