"""Webhook URL checks and redaction (pure functions, no network)."""

import pytest

from chat_magic.errors import WebhookURLError
from chat_magic.webhook import parse_webhook_url, redact

GOOD = "https://chat.googleapis.com/v1/spaces/AAAAbcd123/messages?key=AIzaSyFAKEKEY000000000&token=FAKE-TOKEN-value_123%3D"


def test_parses_a_google_url():
    w = parse_webhook_url(GOOD)
    assert w.space == "AAAAbcd123"
    assert w.key == "AIzaSyFAKEKEY000000000"
    assert w.token == "FAKE-TOKEN-value_123="
    assert w.base == "https://chat.googleapis.com/v1/spaces/AAAAbcd123/messages"
    assert w.space_key == "chat.googleapis.com/AAAAbcd123"


def test_repr_and_str_are_redacted():
    w = parse_webhook_url(GOOD)
    for shown in (repr(w), str(w), w.redacted, f"{w}", f"{w!r}"):
        assert "AIzaSyFAKEKEY" not in shown and "FAKE-TOKEN" not in shown
        assert "AAAAbcd123" in shown


def test_request_url_carries_thread_option_and_request_id():
    w = parse_webhook_url(GOOD)
    u = w.request_url(request_id="cm-1", threaded=True)
    assert "messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD" in u
    assert "requestId=cm-1" in u
    assert "token=FAKE-TOKEN-value_123%3D" in u  # round-trips the encoded token
    assert "messageReplyOption" not in w.request_url(request_id="cm-1", threaded=False)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/v1/spaces/S/messages?key=k&token=t",
    "http://localhost/v1/spaces/S/messages?key=k&token=t",
    "http://[::1]:9000/v1/spaces/S/messages?key=k&token=t",
    "http://127.8.9.10:1/v1/spaces/S/messages/?key=k&token=t",
    "  " + GOOD + "\n",
])
def test_accepts_loopback_http_and_whitespace(url):
    assert parse_webhook_url(url).space


@pytest.mark.parametrize("url, words", [
    ("", "empty"),
    ("   ", "empty"),
    ("chat.googleapis.com/v1/spaces/S/messages?key=SECRETK&token=SECRETT", "https://"),
    ("ftp://chat.googleapis.com/v1/spaces/S/messages?key=SECRETK&token=SECRETT", "https://"),
    ("http://chat.googleapis.com/v1/spaces/S/messages?key=SECRETK&token=SECRETT", "plain http"),
    ("https://evil.example.com/v1/spaces/S/messages?key=SECRETK&token=SECRETT", "not evil.example.com"),
    ("https://chat.googleapis.com.evil.com/v1/spaces/S/messages?key=SECRETK&token=SECRETT", "points at"),
    ("https://chat.googleapis.com/v1/spaces/S?key=SECRETK&token=SECRETT", "path"),
    ("https://chat.googleapis.com/v2/spaces/S/messages?key=SECRETK&token=SECRETT", "path"),
    ("https://chat.googleapis.com/v1/spaces/S/messages?token=SECRETT", "no key"),
    ("https://chat.googleapis.com/v1/spaces/S/messages?key=SECRETK", "no token"),
    ("https://chat.googleapis.com/v1/spaces/S/messages?key=&token=", "no key and no token"),
    ("https://chat.googleapis.com/v1/spaces/S/messages", "no key"),
    ("https://u:p@chat.googleapis.com/v1/spaces/S/messages?key=SECRETK&token=SECRETT", "user name"),
    ("https://chat.googleapis.com:99999/v1/spaces/S/messages?key=SECRETK&token=SECRETT", "not a valid URL"),
    ("https://chat.googleapis.com/v1/spaces/S/messages?key=SECRETK&key=SECRETK2&token=SECRETT", "repeats"),
    ("http://10.0.0.1/v1/spaces/S/messages?key=SECRETK&token=SECRETT", "plain http"),
])
def test_refuses_bad_urls_with_one_clear_line(url, words):
    with pytest.raises(WebhookURLError) as e:
        parse_webhook_url(url)
    msg = str(e.value)
    assert words in msg
    assert "\n" not in msg
    assert "SECRETK" not in msg and "SECRETT" not in msg


def test_refuses_non_strings():
    with pytest.raises(WebhookURLError, match="string"):
        parse_webhook_url(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [
    "HTTPSConnectionPool(host='chat.googleapis.com'): Max retries exceeded with url: /v1/spaces/S/messages?key=SECRETK&token=SECRETT&requestId=x",
    "403 Client Error: Forbidden for url: http://127.0.0.1:1/v1/spaces/S/messages?token=SECRETT&key=SECRETK",
    "quoted 'https://x/?key=SECRETK' and \"token=SECRETT\"",
    "encoded messages%3Fkey%3DSECRETK%26token%3DSECRETT",
    "KEY=SECRETK Token=SECRETT",
])
def test_redact_scrubs_key_and_token_anywhere(text):
    out = redact(text)
    assert "SECRETK" not in out and "SECRETT" not in out
    assert "…" in out
