"""Webhook URLs: parse, check, build request URLs, and redact secrets.

A Google Chat incoming webhook URL carries two secrets in its query string,
``key`` and ``token``. Anyone holding them can post into the space, so no
repr, log line, warning or exception of chat_magic ever shows them: everything
that may print a URL goes through :func:`redact`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from .errors import WebhookURLError

CHAT_HOST = "chat.googleapis.com"
_PATH = re.compile(r"^/v1/spaces/(?P<space>[A-Za-z0-9_-]+)/messages/?$")
# key=..., token=... in any text (URLs inside exception messages included),
# also percent-encoded forms such as key%3D...
_SECRET_PARAM = re.compile(r"(?i)((?:^|[?&;\s\"'(]|%26|%3F)(?:key|token)(?:=|%3D))[^&\s\"'<>)#]+")
REDACTED = "…"


def redact(text: object) -> str:
    """Return ``str(text)`` with every ``key=`` and ``token=`` value replaced by ``…``.

    Safe on any text: URLs, exception messages, log lines.
    """
    return _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, str(text))


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Webhook:
    """A checked webhook URL. Its repr and str are redacted."""

    url: str = field(repr=False)
    space: str
    base: str = field(repr=False)  # scheme://host[:port]/v1/spaces/X/messages, no query
    key: str = field(repr=False)
    token: str = field(repr=False)

    @property
    def space_key(self) -> str:
        """Identifies the space for pacing: the quota is per space."""
        return f"{urlsplit(self.base).netloc}/{self.space}"

    @property
    def redacted(self) -> str:
        return redact(self.url)

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"Webhook({self.redacted!r})"

    def request_url(self, *, request_id: str | None = None, threaded: bool = False) -> str:
        """The URL to POST to: key and token, plus requestId and messageReplyOption."""
        params = {"key": self.key, "token": self.token}
        if threaded:
            params["messageReplyOption"] = "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"
        if request_id:
            params["requestId"] = request_id
        return f"{self.base}?{urlencode(params, quote_via=quote)}"


def parse_webhook_url(url: str) -> Webhook:
    """Check a webhook URL and return a :class:`Webhook`.

    Accepts ``https://chat.googleapis.com/v1/spaces/ID/messages?key=K&token=T``,
    and plain ``http`` only for loopback hosts (the local emulator). Raises
    :class:`WebhookURLError` with one line saying what is wrong; the message
    never contains the key or the token.
    """
    if not isinstance(url, str):
        raise WebhookURLError(f"a webhook URL must be a string, not {type(url).__name__}")
    url = url.strip()
    if not url:
        raise WebhookURLError("the webhook URL is empty: copy it from the space's Apps & integrations > Webhooks")
    if any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in url):  # not shown: redaction stops at a space
        raise WebhookURLError("the webhook URL has a space or a line break inside: paste exactly one URL, in one piece")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        raise WebhookURLError(f"not a valid URL: {redact(url)}") from None
    shown = redact(url)
    if parts.scheme not in ("https", "http"):
        raise WebhookURLError(f"a webhook URL starts with https://{CHAT_HOST}/, got {shown}")
    if not host:
        raise WebhookURLError(f"the webhook URL has no host: {shown}")
    loopback = is_loopback(host)
    if parts.scheme == "http" and not loopback:
        raise WebhookURLError(f"plain http is only accepted for a local emulator; use https://{CHAT_HOST}/...: {shown}")
    if not loopback and host.lower() != CHAT_HOST:
        raise WebhookURLError(f"a Google Chat webhook URL points at {CHAT_HOST}, not {host}: {shown}")
    if parts.username or parts.password:
        raise WebhookURLError(f"a webhook URL carries no user name or password: {shown}")
    m = _PATH.match(parts.path)
    if not m:
        raise WebhookURLError(f"the path must be /v1/spaces/SPACE_ID/messages: {shown}")
    query = parse_qs(parts.query, keep_blank_values=True)
    missing = [p for p in ("key", "token") if not (query.get(p) or [""])[0]]
    if missing:
        raise WebhookURLError(f"the webhook URL has no {' and no '.join(missing)}: copy the whole URL from the space's webhook settings")
    if len(query["key"]) > 1 or len(query["token"]) > 1:
        raise WebhookURLError(f"the webhook URL repeats key or token: {shown}")
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None:
        netloc = f"{netloc}:{port}"
    base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
    return Webhook(url=url, space=m.group("space"), base=base, key=query["key"][0], token=query["token"][0])


def scrubber(webhook: Webhook | None) -> Callable[[str], str]:
    """A function that replaces this webhook's own key and token in a text.

    Front ends apply it to a whole output or traceback *before* cutting a
    tail or a part from it, so no cut can leave a fragment of a secret.
    Values shorter than 4 characters are not real secrets and are left alone.
    """
    secrets = sorted((s for s in (getattr(webhook, "key", ""), getattr(webhook, "token", "")) if s and len(s) >= 4),
                     key=len, reverse=True)

    def scrub(text: str) -> str:
        for s in secrets:
            text = text.replace(s, REDACTED)
        return text

    return scrub
