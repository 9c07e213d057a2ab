"""Payload building: escaping of untrusted text, splitting, truncation (no network)."""

import json

import pytest
from conftest import validate_message

from chat_magic.errors import MessageError
from chat_magic.message import (
    MAX_BYTES,
    MAX_TEXT,
    ZWSP,
    build_payloads,
    code_block,
    neutralize,
    split_text,
    strip_ansi,
    truncate_text,
)


def test_neutralize_breaks_mentions_links_and_fences():
    out = neutralize("hi <users/all> and <users/123> see <https://x.example|here> ```")
    assert "<users/all>" not in out and "<users/123>" not in out
    assert "<https://x.example|" not in out
    assert "```" not in out and "``" not in out
    assert out.replace(ZWSP, "") == "hi <users/all> and <users/123> see <https://x.example|here> ```"


def test_code_block_cannot_be_escaped():
    block = code_block("a\n```\n<users/all>\n```\nb")
    assert block.startswith("```\n") and block.endswith("\n```")
    assert block.count("```") == 2
    assert "<users/all>" not in block


def test_strip_ansi_and_carriage_returns():
    assert strip_ansi("\x1b[31mred\x1b[0m plain\x1b]0;title\x07") == "red plain"
    assert strip_ansi("10%\r50%\r100%\ndone") == "100%\ndone"
    assert strip_ansi("a\x00b\x07c") == "abc"


def test_split_keeps_everything_in_order_within_limits():
    text = "\n".join(f"line {i} " + "x" * (i % 50) for i in range(3000))
    parts = split_text(text)
    assert len(parts) > 1
    assert all(len(p) <= MAX_TEXT for p in parts)
    assert "".join(parts) == text


def test_split_closes_and_reopens_code_blocks():
    text = "intro\n```\n" + "\n".join(f"row {i}" for i in range(2000)) + "\n```\noutro"
    parts = split_text(text)
    assert len(parts) >= 3
    for p in parts:
        assert len(p) <= MAX_TEXT
        assert p.count("```") % 2 == 0, "each part renders on its own"
    joined = "".join(parts)
    for i in range(2000):
        assert f"row {i}\n" in joined or joined.endswith(f"row {i}")


def test_split_without_newlines_or_spaces():
    text = "y" * 10_000
    parts = split_text(text)
    assert [len(p) for p in parts[:-1]] == [len(parts[0])] * (len(parts) - 1)
    assert "".join(parts) == text


def test_truncate_says_how_much_was_cut():
    out = truncate_text("z" * 10_000)
    assert len(out) <= MAX_TEXT
    cut = 10_000 - out.count("z")
    assert f"{cut:,} characters cut" in out


def test_truncate_closes_an_open_code_block():
    out = truncate_text("```\n" + "q" * 9000)
    assert len(out) <= MAX_TEXT
    assert out.count("```") == 2


def test_build_payloads_thread_and_validation():
    ps = build_payloads("hello", thread_key="k1")
    assert ps == [{"text": "hello", "thread": {"threadKey": "k1"}}]
    validate_message(ps[0])
    long = build_payloads("w " * 5000, thread_key="k1")
    assert len(long) == 3 and all(p["thread"] == {"threadKey": "k1"} for p in long)
    assert len(build_payloads("w " * 5000, truncate=True)) == 1


@pytest.mark.parametrize("text", ["", "   \n", None])
def test_empty_message_is_refused(text):
    with pytest.raises(MessageError, match="empty"):
        build_payloads(text)


def test_worst_case_text_fits_the_byte_limit():
    # control characters are removed, but JSON still escapes quotes and backslashes
    ps = build_payloads('"\\' * 3000)
    for p in ps:
        assert len(json.dumps(p, ensure_ascii=False).encode()) < MAX_BYTES


def test_oversized_cards_are_refused_before_queueing():
    card = {"cardId": "c", "card": {"sections": [{"widgets": [{"textParagraph": {"text": "x" * 40_000}}]}]}}
    with pytest.raises(MessageError, match="32,000"):
        build_payloads(None, cards=[card])


def test_bytes_are_decoded_and_terminal_codes_dropped():
    (p,) = build_payloads(b"caf\xc3\xa9 \xff ok")
    assert p["text"] == "café \ufffd ok"
    (p,) = build_payloads("\x1b[1;32mgreen\x1b[0m\r\nnext\x07")
    assert p["text"] == "green\nnext"


def test_a_text_too_long_to_split_sensibly_is_refused_with_the_fix():
    from chat_magic.message import MAX_PARTS

    with pytest.raises(MessageError, match="truncate=True"):
        build_payloads("x" * (MAX_PARTS * MAX_TEXT + 1))
    assert len(build_payloads("x" * (MAX_PARTS * MAX_TEXT + 1), truncate=True)) == 1
