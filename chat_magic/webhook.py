"""Webhook URLs: parsed once into a value that cannot show its secrets.

A Google Chat incoming webhook URL carries two secrets in its query string,
``key`` and ``token``. Anyone holding them can post into the space, so:

- :func:`parse_webhook_url` turns the string into a :class:`Webhook` at once:
  parameter names percent-decoded (``%6Bey=`` is ``key=``), a repeated
  parameter refused, a ``#fragment`` and unknown parameters dropped. The raw
  string is not kept: the value holds the canonical parts only.
- The key and token live in :class:`Sealed` holders. Their ``repr`` is ``…``
  and they are read only by calling :meth:`Sealed.reveal`, so neither a repr,
  nor an f-string, nor IPython's ``%xmode Verbose`` (which prints variables and
  attribute values of every frame, but never calls anything) can show them.
- Error messages never echo the URL: at most its scheme and host.
- :meth:`Webhook.scrub` removes the webhook's own key and token from any text,
  in any spelling the URL parser accepts (raw, percent-encoded, mixed), and
  fragments left at the edge of a text that was cut before it got here.
  Scrub a whole text *before* splitting, tailing or shortening it.
- :func:`redact` is the fallback for texts that may hold *some* URL: it
  blanks every ``key=``/``token=`` value (names percent-encoded too, ``=``
  spelled ``%3D``, ``%253D``, ``&#61;``, ``\\u003d``...) and ``"key": "..."``.
- :func:`scrub_error` is for what a *server* says (an error body): it may
  echo the secrets in any spelling a web stack produces (percent-encoded
  twice, HTML entities, JSON ``\\u`` escapes, prose such as "API key X not
  valid"). It scrubs with the webhook's exact values and the generic
  patterns, makes it one line and caps it at :data:`ERROR_CAP` characters.
- A :class:`Webhook` pickles (and ``yaml.dump``\\ s) *without* its secrets:
  as its digest, found again on unpickling among the process's webhooks or
  the configured ones; elsewhere it unpickles as a webhook that cannot post
  and says so in one line. ``copy`` returns the same (immutable) value.
"""

from __future__ import annotations

import hashlib
import html.entities
import ipaddress
import re
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from .errors import WebhookURLError

__all__ = [
    "REDACTED", "Sealed", "Webhook", "add_finder", "is_loopback", "parse_webhook_url", "redact", "scrub_error",
    "scrub_known"
]

CHAT_HOST = "chat.googleapis.com"
_PATH = re.compile(r"^/v1/spaces/(?P<space>[A-Za-z0-9_-]+)/messages/?$")
REDACTED = "…"
_BLANK_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
MIN_SECRET = 8  # shorter values are test stand-ins ("k"): scrubbing them would mangle ordinary text


def _spelled(word: str) -> str:
    """A regex for ``word`` with any of its letters percent-encoded (``%6Bey`` for ``key``)."""
    return "".join(f"(?:{re.escape(c)}|%{ord(c):02x})" for c in word)


# what may stand before a parameter name: start, a separator, an encoded ? or & (once or twice, JSON, HTML)
_BEFORE = r"(?:^|[?&;\s\"'(/]|%26|%3F|%2526|%253F|\\u0026|\\u003F)"
# "=" as a web stack may spell it: raw, percent-encoded once or twice, an HTML entity, a JSON or Python escape
_EQUALS = r"(?:=|%3D|%253D|&#0*61;?|&#x0*3D;?|&equals;|\\u003D|\\x3D)"
# key=..., token=... in any text, names percent-encoded too
_SECRET_PARAM = re.compile(
    rf"(?i)({_BEFORE}(?:{_spelled('key')}|{_spelled('token')}){_EQUALS})[^&\s\"'<>#\\]+"
)
# "key": "...", 'token': '...', and the same inside a JSON string (\"key\": \"...\")
_SECRET_FIELD = re.compile(r"""(?i)((?:\\?["'])(?:api_?key|key|token)(?:\\?["'])\s*:\s*(?:\\?["']))[^"'\\\s]+""")


def redact(text: object) -> str:
    """``str(text)`` with every ``key=`` and ``token=`` value replaced by ``…``.

    For texts that may hold any webhook URL (exception messages, log lines).
    A text that may hold a *known* webhook's secrets goes through
    :meth:`Webhook.scrub` first.
    """
    text = _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, str(text))
    return _SECRET_FIELD.sub(lambda m: m.group(1) + REDACTED, text)


ERROR_CAP = 2048  # characters of a server's error text kept in the outbox and shown
# prose that names a secret: "API key AIza... not valid", "token abc...def expired"
_PROSE_SECRET = re.compile(r"(?i)\b((?:api[ _-]?)?key|token)(\s+|\s*:\s*)([A-Za-z0-9_\-.~+/%=]{16,})")
_GOOGLE_API_KEY = re.compile(r"AIza[0-9A-Za-z_\-]{20,}")  # Google's API key shape, whoever's it is


def scrub_error(text: object, webhook: Webhook | None = None, *, limit: int = ERROR_CAP) -> str:
    """What a server said (an error body, an exception), safe to store, log and show: one line, capped.

    A server may echo the request's key and token in any spelling its stack
    produces, so this scrubs with ``webhook``'s exact values in every
    encoding (:meth:`Webhook.scrub`), and with the generic patterns
    (:func:`redact`, prose such as "API key X not valid", any Google API
    key) for a webhook it does not know. Scrubbed *before* the cut.
    """
    s = str(text)
    for hook in [webhook] if webhook is not None else []:
        s = hook.scrub(s, cut_after=True)  # the server may have cut its echo: a trailing piece goes too
    s = scrub_known(redact(s))
    s = _PROSE_SECRET.sub(lambda m: m.group(1) + m.group(2) + REDACTED, s)
    s = _GOOGLE_API_KEY.sub(REDACTED, s)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: max(0, limit - 1)] + REDACTED


class Sealed:
    """A secret string that never shows itself.

    ``repr``/``str`` are ``…``; :meth:`reveal` returns the value. The value sits
    in a closure, not an attribute, so debuggers and verbose tracebacks that
    evaluate attributes (but never call) cannot print it.
    """

    __slots__ = ("_get",)

    def __init__(self, value: str) -> None:
        self._get: Callable[[], str] = lambda: value

    def reveal(self) -> str:
        return self._get()

    def __repr__(self) -> str:
        return "Sealed(…)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.reveal() == other.reveal()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.reveal())

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a sealed secret does not pickle: pickle the Webhook (it travels as its digest) or a space's name")

    def __copy__(self) -> Sealed:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Sealed:
        return self


class _Unknown(Sealed):
    """The secret of a webhook unpickled where neither it nor its configuration is known: using it is one line."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("")

    def reveal(self) -> str:
        from .errors import ConfigError

        raise ConfigError("this webhook was unpickled in a process that does not know it (a pickle never carries the key "
                          "and token): pass a space's name (to='ml-team', see chat-magic spaces add) or set "
                          "GOOGLE_CHAT_WEBHOOK_URL in this process")

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return id(self)


_NAMED: dict[str, list[str]] = {}  # a character -> its HTML5 named entities ("=" -> "equals;")
for _name, _char in html.entities.html5.items():
    if len(_char) == 1 and ord(_char) < 128 and _name.endswith(";"):
        _NAMED.setdefault(_char, []).append(_name)


def _char_spellings(c: str) -> list[str]:
    """Regexes for one character as a web stack may write it: raw, %XX once or twice, HTML entities, escapes."""
    if ord(c) >= 128:
        return [re.escape(c)]
    h = f"{ord(c):02x}"
    alts = [re.escape(c), f"%(?i:{h})", f"%25(?i:{h})", rf"&#0*{ord(c)};?", rf"&#(?i:x0*{h.lstrip('0') or '0'});?",
            rf"\\(?i:u00{h})", rf"\\(?i:x{h})"]
    alts += [re.escape("&" + name) for name in _NAMED.get(c, [])]
    if c == "/":
        alts.append(r"\\/")
    if c == " ":
        alts.append(r"\+")
    return alts


@lru_cache(maxsize=64)
def _secret_pattern(value: str) -> re.Pattern[str]:
    """Matches ``value`` with each character in any spelling of :func:`_char_spellings` (mixed too)."""
    return re.compile("".join("(?:" + "|".join(_char_spellings(c)) + ")" for c in value))


def _spellings(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((value, quote(value, safe=""), quote(value, safe="").lower())))


_EDGE_HEAD = re.compile(r"[^&\s\"'<>()#?]+")
_EDGE_TAIL = re.compile(r"[^&\s\"'<>()#?=]+$")


class Webhook:
    """A checked webhook: where to post, and the two secrets, sealed.

    ``repr``/``str`` show ``scheme://host/v1/spaces/ID/messages?key=…&token=…``.
    Two spellings of one webhook (parameters in another order, names
    percent-encoded) are equal and have the same :attr:`id`.
    """

    __slots__ = ("space", "base", "_key", "_token", "_digest")

    def __init__(self, base: str, space: str, key: Sealed, token: Sealed, *, digest: str = "") -> None:
        self.base = base  # scheme://host[:port]/v1/spaces/X/messages: no secret
        self.space = space
        self._key = key
        self._token = token
        self._digest = digest
        if not digest:
            _remember(self)

    # -- identity ------------------------------------------------------------

    @property
    def key(self) -> str:
        return self._key.reveal()

    @property
    def token(self) -> str:
        return self._token.reveal()

    @property
    def space_key(self) -> str:
        """Identifies the space for pacing: the quota is per space, whatever the webhook."""
        return f"{urlsplit(self.base).netloc}/{self.space}"

    @property
    def id(self) -> str:
        """A digest of the canonical URL: names one destination without showing it."""
        if not self._digest:  # a digest shows nothing of the secrets: it may be kept in the open
            self._digest = hashlib.sha256(self.reveal_url().encode("utf-8")).hexdigest()[:32]
        return self._digest

    def reveal_url(self) -> str:
        """The canonical URL, secrets included: only for the outbox file (0600) and the request."""
        return f"{self.base}?{urlencode({'key': self._key.reveal(), 'token': self._token.reveal()}, quote_via=quote)}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Webhook) and (self.base, self._key, self._token) == (other.base, other._key, other._token)

    def __hash__(self) -> int:
        return hash((self.base, self._key, self._token))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (and ``yaml.dump``\\ ed) as its digest, never its secrets: see :func:`_unpickle`."""
        return (_unpickle, (self.id, self.base, self.space))

    def __copy__(self) -> Webhook:
        return self  # immutable: a copy is the same value

    def __deepcopy__(self, memo: dict[int, Any]) -> Webhook:
        return self

    @property
    def redacted(self) -> str:
        return f"{self.base}?key={REDACTED}&token={REDACTED}"

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"Webhook({self.redacted!r})"

    def request_url(self, *, request_id: str | None = None, threaded: bool = False) -> str:
        """The URL to POST to: key and token, plus requestId and messageReplyOption."""
        params = {"key": self._key.reveal(), "token": self._token.reveal()}
        if threaded:
            params["messageReplyOption"] = "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"
        if request_id:
            params["requestId"] = request_id
        return f"{self.base}?{urlencode(params, quote_via=quote)}"

    # -- scrubbing -----------------------------------------------------------

    def scrub(self, text: str, *, cut_before: bool = False, cut_after: bool = False) -> str:
        """``text`` without this webhook's key and token (other text is left as it is).

        Any spelling the URL parser would accept is found (each character raw
        or ``%XX``). Call it on the whole text *before* any cut. For a text
        that was already cut by someone else (a bounded output buffer), say so:
        ``cut_before`` blanks a leading fragment that ends a secret,
        ``cut_after`` a trailing one that starts a secret.
        """
        for sealed in (self._key, self._token):
            if isinstance(sealed, _Unknown):
                continue  # nothing known to scrub (it cannot post either)
            if len(sealed.reveal()) >= MIN_SECRET:
                text = _secret_pattern(sealed.reveal()).sub(REDACTED, text)
                if cut_before:
                    text = _blank_edge(text, _EDGE_HEAD.match(text), _spellings(sealed.reveal()), str.endswith)
                if cut_after:
                    text = _blank_edge(text, _EDGE_TAIL.search(text), _spellings(sealed.reveal()), str.startswith)
        return text


# -- the webhooks this process knows: for unpickling, and for scrubbing texts that may hold any of them --

_known: dict[str, Webhook] = {}  # digest -> the first Webhook parsed with it (guarded by _known_lock)
_known_lock: Any = threading.RLock()  # reentrant: a signal handler's send may run while this thread holds it
_KNOWN_MAX = 256  # a process that parses endless distinct URLs keeps the first ones only


def _remember(hook: Webhook) -> None:
    with _known_lock:
        if len(_known) < _KNOWN_MAX:
            _known.setdefault(hook.id, hook)


def scrub_known(text: str) -> str:
    """``text`` without the secrets of any webhook this process has parsed (log lines, errors of unknown origin)."""
    with _known_lock:
        hooks = list(_known.values())
    for hook in hooks:
        text = hook.scrub(text)
    return text


def _unpickle(digest: str, base: str, space: str) -> Webhook:
    """The webhook a pickle names by its digest: this process's, a configured one, or one that cannot post.

    A pickle carries no secret: a forked worker finds the webhook among the
    parent's, another process among its configuration (the default webhook,
    the named spaces); anywhere else the webhook says in one line, when used,
    how to name it instead.
    """
    hook = _known.get(digest) or _configured(digest)
    if hook is not None:
        return hook
    return Webhook(base, space, _Unknown(), _Unknown(), digest=digest)


_finders: list[Callable[[str], Webhook | None]] = []  # see add_finder


def add_finder(find: Callable[[str], Webhook | None]) -> None:
    """Let ``find(digest)`` name a webhook this process has not parsed yet, for unpickling.

    The configured destinations live above this module (``config`` imports
    it), so the package wires them in (``chat_magic/__init__.py``) rather
    than this module importing its own caller.
    """
    if find not in _finders:
        _finders.append(find)


def _configured(digest: str) -> Webhook | None:
    for find in list(_finders):
        try:
            hook = find(digest)
        except Exception:
            continue
        if hook is not None:
            return hook
    return None


def _blank_edge(text: str, m: re.Match[str] | None, spellings: tuple[str, ...], fits: Callable[[str, str], bool]) -> str:
    """Replace the run ``m`` at an edge of ``text`` with ``…`` when it is a piece of a secret."""
    if m is None or not m.group(0):
        return text
    frag = m.group(0)
    if any(fits(s, frag) or fits(s.lower(), frag.lower()) for s in spellings):
        return text[: m.start()] + REDACTED + text[m.end():]
    return text


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_webhook_url(url: str) -> Webhook:
    """Check a webhook URL and return a :class:`Webhook`.

    Accepts ``https://chat.googleapis.com/v1/spaces/ID/messages?key=K&token=T``,
    and plain ``http`` only for loopback hosts (the local emulator). Raises
    :class:`WebhookURLError` with one line saying what is wrong; the message
    never contains the key or the token, nor any part of the query.
    """
    if not isinstance(url, str):
        raise WebhookURLError(f"a webhook URL must be a string, not {type(url).__name__}")
    sealed = Sealed(url.strip())
    del url  # from here on, a verbose traceback shows this frame's arguments as unresolvable, not the URL
    return _parse(sealed)


def _parse(raw: Sealed) -> Webhook:
    if not raw.reveal():
        raise WebhookURLError("the webhook URL is empty: copy it from the space's Apps & integrations > Webhooks")
    if _BLANK_OR_CONTROL.search(raw.reveal()):
        raise WebhookURLError("the webhook URL has a space or a line break inside: paste exactly one URL, in one piece")
    try:
        parts = urlsplit(raw.reveal())
        host, port = parts.hostname or "", parts.port
    except ValueError:
        raise WebhookURLError("not a valid URL (a bad port or a broken [IPv6] host): copy the webhook URL again") from None
    if parts.scheme not in ("https", "http"):
        raise WebhookURLError(f"a webhook URL starts with https://{CHAT_HOST}/: copy the whole URL from the space's webhook settings")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLError("a webhook URL carries no user name or password: copy the URL again from the space's webhook settings")
    if not host:
        raise WebhookURLError(f"the webhook URL has no host: it starts with https://{CHAT_HOST}/")
    loopback = is_loopback(host)
    if parts.scheme == "http" and not loopback:
        raise WebhookURLError(f"plain http is only accepted for a local emulator; use https://{CHAT_HOST}/...")
    if not loopback and host != CHAT_HOST:
        raise WebhookURLError(f"a Google Chat webhook URL points at {CHAT_HOST}, not {_shown_host(host)}")
    m = _PATH.match(parts.path)
    if not m:
        raise WebhookURLError("the path must be /v1/spaces/SPACE_ID/messages: copy the whole URL from the space's webhook settings")
    key, token = _secrets(raw)
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None:
        netloc = f"{netloc}:{port}"
    return Webhook(f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}", m.group("space"), key, token)


def _shown_host(host: str) -> str:
    """A host as an error may show it: DNS characters only, never a whole query."""
    return host if re.fullmatch(r"[a-z0-9.:\[\]-]{1,253}", host) else "another host"


def _secrets(raw: Sealed) -> tuple[Sealed, Sealed]:
    """Key and token from the query: names percent-decoded, each given exactly once; the fragment dropped."""
    pairs = parse_qsl(urlsplit(raw.reveal()).query, keep_blank_values=True)
    names = [n for n, _ in pairs]
    if len(names) != len(set(names)):
        raise WebhookURLError("the webhook URL repeats a parameter: copy it again from the space's webhook settings")
    values = dict(pairs)
    missing = [p for p in ("key", "token") if not values.get(p)]
    if missing:
        raise WebhookURLError(f"the webhook URL has no {' and no '.join(missing)}: copy the whole URL from the space's webhook settings")
    if _BLANK_OR_CONTROL.search(values["key"]) or _BLANK_OR_CONTROL.search(values["token"]):
        raise WebhookURLError("the webhook URL's key or token has a space or a control character: copy the URL again")
    return Sealed(values.pop("key")), Sealed(values.pop("token"))
