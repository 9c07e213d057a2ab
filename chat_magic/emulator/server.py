"""A local emulator of Google Chat's incoming-webhook endpoint.

It speaks real HTTP on a loopback address and behaves like
``https://chat.googleapis.com/v1/spaces/SPACE/messages?key=K&token=T`` as far as
a webhook client can tell: the same URLs, the same JSON replies and error
bodies, threads, ``requestId`` idempotency, the per-space quota and the message
limits (see https://developers.google.com/workspace/chat/quickstart/webhooks and
https://developers.google.com/workspace/chat/limits). On top of that it can
inject faults (5xx, 429, connection resets, lost replies, stalls, outages) so
the delivery code can be tested against everything the real service does.

Standard library only. When the ``google-apps-chat`` package is installed and
``strict`` is true, every request body is also checked against Google's own
``Message`` proto (unknown or misspelled fields at any depth, wrong types, bad
enum names); without it a lighter check of the top-level fields is done.

Order of the checks for ``POST .../messages`` (documented behaviour of this
emulator; Google does not document its order):

1. injected faults (consumed first, before anything else is looked at);
2. authentication: ``key`` (400 INVALID_ARGUMENT), then ``token``
   (403 PERMISSION_DENIED);
3. ``requestId`` replay: a request whose ``requestId`` already names a message
   in that space is answered 200 with that message; nothing is stored, it is
   counted in ``duplicates_suppressed``, and it neither is refused by nor
   consumes the quota;
4. quota (429 RESOURCE_EXHAUSTED), measured at the request's arrival with
   ``time.monotonic``; only accepted (stored) messages consume it;
5. validation of the query and the body (400 INVALID_ARGUMENT);
6. threading (404 NOT_FOUND for ``REPLY_MESSAGE_OR_FAIL`` and no such thread);
7. store and answer 200 with the created ``Message``.

Secrets: the ``key`` and ``token`` of a request never reach a log line, a
request record or a page; the server's own logging is silenced.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import signal
import socket
import string
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn
from urllib.parse import parse_qs, quote, urlsplit

from ..console import say as _say_line
from ..webhook import REDACTED, is_loopback, redact

PREFIX = "chat_magic emulator"

__all__ = ["Emulator", "render_page", "validate_message", "main", "FAULTS"]

DEFAULT_KEY = "emu-key-0000"
DEFAULT_TOKEN = "emu-token-0000"
DEFAULT_SPACE = "AAAA"
DEFAULT_CLI_PORT = 8085

MAX_MESSAGE_BYTES = 32_000
MAX_TEXT_CHARS = 4_096
MAX_CARD_WIDGETS = 100
MAX_READ_BYTES = 1_048_576  # bodies above this are refused without being read (413)

ERROR_FAULTS = ("429", "500", "502", "503", "504")
FAULTS = ERROR_FAULTS + ("reset", "lost_reply", "stall", "down")
DEFAULT_STALL_SECONDS = 30.0

REPLY_OPTIONS = (
    "MESSAGE_REPLY_OPTION_UNSPECIFIED",
    "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD",
    "REPLY_MESSAGE_OR_FAIL",
)

_MESSAGES_PATH = re.compile(r"^/v1/spaces/(?P<space>[A-Za-z0-9_-]+)/messages/?$")
_CLIENT_MESSAGE_ID = re.compile(r"^client-[a-z0-9-]{1,56}$")
_ID_ALPHABET = string.ascii_letters + string.digits + "_-"

# Every field of google.chat.v1.Message (camelCase JSON names), for the check
# done when google-apps-chat is not installed.
MESSAGE_FIELDS = frozenset(
    [
        "name", "sender", "createTime", "lastUpdateTime", "deleteTime", "text", "formattedText", "cards",
        "cardsV2", "annotations", "thread", "space", "fallbackText", "actionResponse", "argumentText",
        "slashCommand", "attachment", "matchedUrl", "threadReply", "silent", "clientAssignedMessageId",
        "emojiReactionSummaries", "privateMessageViewer", "deletionMetadata", "quotedMessageMetadata",
        "attachedGifs", "accessoryWidgets", "markupSyntax"
    ]
)
# What an incoming webhook may set. Everything else is output-only or reserved
# for apps authenticated as a user or a Chat app.
WEBHOOK_FIELDS = frozenset({"text", "cardsV2", "cards", "thread", "fallbackText", "accessoryWidgets"})
THREAD_FIELDS = frozenset({"name", "threadKey"})

_HTML_502 = (
    "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
    "  <title>Error 502 (Server Error)!!1</title>\n"
    "  <p><b>502.</b> <ins>That\u2019s an error.</ins>\n"
    "  <p>The server encountered a temporary error and could not complete your request."
    "<p>Please try again in 30 seconds.  <ins>That\u2019s all we know.</ins>\n"
)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def error_body(code: int, status: str, message: str, details: list | None = None) -> dict:
    """A ``google.rpc.Status`` wrapped in ``error``, as Google's APIs answer."""
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        err["details"] = details
    return {"error": err}


def _invalid(message: str) -> tuple[int, dict]:
    return 400, error_body(400, "INVALID_ARGUMENT", message)


_FAULT_REPLIES: dict[str, tuple[int, dict]] = {
    "429": (429, error_body(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).")),
    "500": (500, error_body(500, "INTERNAL", "Internal error encountered.")),
    "503": (503, error_body(503, "UNAVAILABLE", "The service is currently unavailable.")),
    "504": (504, error_body(504, "DEADLINE_EXCEEDED", "The request timed out. Please try again.")),
}
_API_KEY_INVALID = error_body(
    400,
    "INVALID_ARGUMENT",
    "API key not valid. Please pass a valid API key.",
    [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "chat.googleapis.com"},
        }
    ],
)
_PERMISSION_DENIED = error_body(403, "PERMISSION_DENIED", "The caller does not have permission")
_NOT_FOUND = error_body(404, "NOT_FOUND", "Requested entity was not found.")
_QUOTA = error_body(
    429,
    "RESOURCE_EXHAUSTED",
    "Resource has been exhausted (e.g. check quota).",
    [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "RATE_LIMIT_EXCEEDED",
            "domain": "googleapis.com",
            "metadata": {"service": "chat.googleapis.com", "quota_limit": "WriteRequestsPerMinutePerSpace"},
        }
    ],
)


# --------------------------------------------------------------------------- validation

_PROTO_MESSAGE: Any = None  # google.apps.chat_v1.types.Message, False when not installed
_PROTO_LOCK = threading.Lock()


def _proto_message() -> Any:
    global _PROTO_MESSAGE
    if _PROTO_MESSAGE is None:
        with _PROTO_LOCK:
            if _PROTO_MESSAGE is None:
                try:
                    from google.apps.chat_v1.types import Message  # type: ignore
                except Exception:  # not installed, or broken: fall back to the stdlib check
                    _PROTO_MESSAGE = False
                else:
                    _PROTO_MESSAGE = Message
    return _PROTO_MESSAGE


def proto_available() -> bool:
    """True when ``google-apps-chat`` can be imported (strict checks use its ``Message``)."""
    return bool(_proto_message())


_NO_FIELD = re.compile(r'has no field named "(?P<name>[^"]+)" at "(?P<at>[^"]*)"')


def _proto_error(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else "parse error"
    m = _NO_FIELD.search(text)
    if m:
        at = m.group("at")
        at = "message" + at[len("Message"):] if at.startswith("Message") else at
        return f"Invalid JSON payload received. Unknown name \"{m.group('name')}\" at '{at}': Cannot find field. ({first})"
    return f"Invalid JSON payload received. {first}"


def _stdlib_schema_check(obj: dict) -> str | None:
    """A light check of the top-level fields, used when google-apps-chat is absent."""
    for name, value in obj.items():
        camel = _camel(name)
        if camel not in MESSAGE_FIELDS:
            return f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
        if camel in ("text", "fallbackText") and not isinstance(value, str):
            return f'Invalid value at \'message.{camel}\' (TYPE_STRING), {json.dumps(value)[:100]}'
        if camel in ("cardsV2", "cards", "accessoryWidgets") and not isinstance(value, list):
            return f"Invalid value at 'message.{camel}': expected a list, got {type(value).__name__}"
        if camel == "thread":
            if not isinstance(value, dict):
                return f"Invalid value at 'message.thread': expected an object, got {type(value).__name__}"
            for tname, tval in value.items():
                if _camel(tname) not in THREAD_FIELDS:
                    return f'Invalid JSON payload received. Unknown name "{tname}" at \'message.thread\': Cannot find field.'
                if not isinstance(tval, str):
                    return f"Invalid value at 'message.thread.{_camel(tname)}' (TYPE_STRING), {json.dumps(tval)[:100]}"
    return None


def _card_problem(cards: list) -> str | None:
    if len(cards) > 1 and any(not (isinstance(c, dict) and (c.get("cardId") or c.get("card_id"))) for c in cards):
        return "Invalid argument: cardId is required for every card when a message has more than one card."
    for i, entry in enumerate(cards):
        if not isinstance(entry, dict):
            return f"Invalid value at 'message.cards_v2[{i}]': expected an object."
        card = entry.get("card")
        if not isinstance(card, dict):
            return f"Invalid argument: cards_v2[{i}].card is required."
        if "header" in card:
            header = card["header"]
            if not isinstance(header, dict) or not str(header.get("title") or "").strip():
                return f"Invalid argument: cards_v2[{i}].card.header.title is required when the card has a header."
        sections = card.get("sections") or []
        if not isinstance(sections, list):
            return f"Invalid value at 'message.cards_v2[{i}].card.sections': expected a list."
        widgets = 0
        for j, section in enumerate(sections):
            ws = section.get("widgets") if isinstance(section, dict) else None
            if not ws:
                return f"Invalid argument: cards_v2[{i}].card.sections[{j}] must contain at least one widget."
            widgets += len(ws) if isinstance(ws, list) else 1
        if widgets > MAX_CARD_WIDGETS:
            return f"Invalid argument: cards_v2[{i}].card has {widgets} widgets; a card can have at most {MAX_CARD_WIDGETS}."
        problem = _image_url_problem(card, f"cards_v2[{i}].card")
        if problem:
            return problem
    return None


_IMAGE_URL_FIELDS = ("imageUrl", "image_url", "iconUrl", "icon_url", "imageUri", "image_uri")


def _image_url_problem(node: Any, where: str) -> str | None:
    """An image URL that Google could not fetch: it must be https (plain http only to a loopback host, for tests)."""
    from urllib.parse import urlsplit

    from ..webhook import is_loopback

    if isinstance(node, list):
        for k, v in enumerate(node):
            problem = _image_url_problem(v, f"{where}[{k}]")
            if problem:
                return problem
    elif isinstance(node, dict):
        for name, value in node.items():
            if name in _IMAGE_URL_FIELDS and isinstance(value, str):
                try:
                    parts = urlsplit(value)
                    host = parts.hostname or ""
                except ValueError:
                    parts, host = None, ""
                ok = parts is not None and host and (parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host)))
                if not ok:
                    return f"Invalid argument: {where}.{name}: an image URL must be an https:// URL that Google can fetch."
            else:
                problem = _image_url_problem(value, f"{where}.{name}")
                if problem:
                    return problem
    return None


def validate_message(body: bytes, strict: bool = True) -> tuple[dict | None, tuple[int, dict] | None]:
    """Check a request body as Google's webhook endpoint would.

    Returns ``(message, None)`` with the parsed message (top-level names in
    camelCase), or ``(None, (status, error_body))``.

    Always checked: size (32,000 bytes), JSON, an object, basic types, not
    empty, ``text`` at most 4,096 characters. With ``strict``: the schema
    (Google's proto when ``google-apps-chat`` is installed, else the top-level
    fields), the fields a webhook may set, and the card rules (header title,
    non-empty sections, at most 100 widgets, ``cardId`` with several cards).
    """
    if len(body) > MAX_MESSAGE_BYTES:
        return None, _invalid(
            f"Message is too large: {len(body)} bytes; a message can be at most {MAX_MESSAGE_BYTES} bytes."
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, _invalid(f"Invalid JSON payload received. Invalid UTF-8 at byte {e.start}.")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, _invalid(
            f"Invalid JSON payload received. {e.msg} at line {e.lineno} column {e.colno}."
        )
    if not isinstance(obj, dict):
        return None, _invalid('Invalid JSON payload received. Unknown name "": Root element must be a message.')

    if strict:
        proto = _proto_message()
        if proto:
            try:
                proto.from_json(text, ignore_unknown_fields=False)
            except Exception as e:  # google.protobuf.json_format.ParseError and friends
                return None, _invalid(_proto_error(str(e)))
        else:
            problem = _stdlib_schema_check(obj)
            if problem:
                return None, _invalid(problem)

    msg: dict[str, Any] = {}
    for name, value in obj.items():
        msg[_camel(name)] = value
    if isinstance(msg.get("thread"), dict):
        msg["thread"] = {_camel(k): v for k, v in msg["thread"].items()}

    if strict:
        for name in msg:
            if name not in WEBHOOK_FIELDS:
                return None, _invalid(
                    f'Invalid JSON payload received. Field "{name}" cannot be set by an incoming webhook.'
                )

    # Basic types, also when not strict (the proto check covers them when strict).
    if "text" in msg and not isinstance(msg["text"], str):
        return None, _invalid(f"Invalid value at 'message.text' (TYPE_STRING), {json.dumps(msg['text'])[:100]}")
    if "fallbackText" in msg and not isinstance(msg["fallbackText"], str):
        return None, _invalid("Invalid value at 'message.fallback_text' (TYPE_STRING)")
    for name in ("cardsV2", "cards", "accessoryWidgets"):
        if name in msg and not isinstance(msg[name], list):
            return None, _invalid(f"Invalid value at 'message.{name}': expected a list.")
    if "thread" in msg and not isinstance(msg["thread"], dict):
        return None, _invalid("Invalid value at 'message.thread': expected an object.")
    thread = msg.get("thread") or {}
    for name in ("threadKey", "name"):
        if name in thread and not isinstance(thread[name], str):
            return None, _invalid(f"Invalid value at 'message.thread.{name}' (TYPE_STRING)")

    text_value = msg.get("text") or ""
    if not text_value.strip() and not msg.get("cardsV2") and not msg.get("cards"):
        return None, _invalid("Message cannot be empty. Discarded message: it needs text or cardsV2.")
    if len(text_value) > MAX_TEXT_CHARS:
        return None, _invalid(f"Message is longer than {MAX_TEXT_CHARS} characters")
    if len(thread.get("threadKey") or "") > 4000:
        return None, _invalid("Invalid argument: thread key is longer than 4000 characters.")
    if strict and msg.get("cardsV2"):
        problem = _card_problem(msg["cardsV2"])
        if problem:
            return None, _invalid(problem)
    return msg, None


# --------------------------------------------------------------------------- page


def render_page(state: dict, space: str | None = None) -> str:
    """The HTML of ``GET /``: the live web view of :mod:`chat_magic.emulator.webview`.

    ``state`` is a snapshot: ``{"messages": [...], "stats": {...}, "base_url": str}``
    (messages as returned by :meth:`Emulator.messages`); ``space`` shows one space.
    Every value coming from a request is escaped.
    """
    from .webview import render_page as _render

    return _render(state, space=space)


# --------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # bursts of clients must not overflow the listen backlog

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], emulator: Emulator,
                 stop_event: threading.Event) -> None:
        self.emulator = emulator
        self.stop_event = stop_event
        super().__init__(addr, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:  # never print a traceback with a request in it
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # resets, timeouts, closed sockets
            return
        _say_line(f"error while handling a request: {exc!r}", prefix=PREFIX)


class _Aborted(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ESF"
    sys_version = ""
    timeout = 30  # idle keep-alive connections are closed after this
    server: _Server

    def version_string(self) -> str:
        return self.server_version

    # -- plumbing

    def setup(self) -> None:
        super().setup()
        self.server.emulator._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.emulator._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silenced: request lines carry key and token
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server puts the raw request line in some error pages: redact it
        super().send_error(code, redact(message) if message else message, explain)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Aborted:
            self.close_connection = True

    def _abort(self, *, rst: bool) -> NoReturn:
        """Drop the connection without an answer: RST when ``rst``, else FIN."""
        self.close_connection = True
        sock = self.connection
        try:
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for f in (self.rfile, self.wfile):
            try:
                f.close()
            except OSError:
                pass
        try:
            sock.close()
        except OSError:
            pass
        raise _Aborted()

    def _send(self, status: int, body: bytes | str, content_type: str, extra: dict | None = None) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False, indent=2) + "\n", "application/json; charset=UTF-8")

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 411/413."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._send_json(411, error_body(411, "INVALID_ARGUMENT", "Length Required: send a Content-Length."))
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_json(400, error_body(400, "INVALID_ARGUMENT", "Invalid Content-Length."))
            return None
        if length > MAX_READ_BYTES:
            self.close_connection = True
            self._send_json(413, error_body(413, "INVALID_ARGUMENT", "Request Entity Too Large."))
            return None
        return self.rfile.read(length) if length else b""

    # -- dispatch

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        emu = self.server.emulator
        arrival = time.monotonic()
        wall = time.time()
        parts = urlsplit(self.path)
        path = parts.path
        query = parse_qs(parts.query, keep_blank_values=True)
        # the emulator's own pages (and the favicon and robots.txt a browser or crawler asks for) are not webhook
        # requests: never counted
        own = self.command in ("GET", "HEAD") and (path in ("/", "/healthz", "/favicon.ico", "/robots.txt") or path.startswith("/api/"))
        rec = {
            "time": wall,
            "method": self.command,
            "path": path,
            "query": _redacted_query(query),
            "status": None,
            "body": "",
            "outcome": None,
            "fault": None,
            "message": None,
        }
        if emu.down:
            if not own:
                rec["outcome"] = "down"
                emu._finish_request(rec)
            self._abort(rst=True)
        if own:
            self._serve_own(path, query)
            return
        m = _MESSAGES_PATH.match(path)
        if not m or self.command != "POST":
            body = self._read_body() if self.command not in ("GET", "HEAD") else b""
            if body is None:
                return
            rec["body"] = body.decode("utf-8", "replace")
            if m:  # a webhook can only create messages
                status, reply = 401, error_body(
                    401,
                    "UNAUTHENTICATED",
                    "Request is missing required authentication credential. Expected OAuth 2 access token, "
                    "login cookie or other valid authentication credential.",
                )
            else:
                status, reply = 404, _NOT_FOUND
            rec.update(status=status, outcome="rejected")
            emu._finish_request(rec)
            self._send_json(status, reply)
            return
        self._create(m.group("space"), query, arrival, rec)

    def _serve_own(self, path: str, query: dict) -> None:
        emu = self.server.emulator
        if path == "/healthz":
            self._send(200, "ok\n", "text/plain; charset=utf-8")
        elif path == "/api/messages":
            space = (query.get("space") or [None])[0]
            self._send_json(200, {"messages": emu.messages(space)})
        elif path == "/api/stats":
            self._send_json(200, emu.stats())
        elif path == "/":
            space = (query.get("space") or [None])[0]
            self._send(200, render_page(emu._page_state(), space=space), "text/html; charset=utf-8")
        elif path == "/robots.txt":
            self._send(200, "User-agent: *\nDisallow: /\n", "text/plain; charset=utf-8")
        elif path == "/favicon.ico":
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send_json(404, _NOT_FOUND)

    def _create(self, space: str, query: dict, arrival: float, rec: dict) -> None:
        emu = self.server.emulator
        stop_event = self.server.stop_event
        fault, seconds = emu._take_fault()
        rec["fault"] = fault
        if fault == "down":
            rec["outcome"] = "down"
            emu._finish_request(rec)
            self._abort(rst=True)
        body = self._read_body()
        if body is None:
            rec.update(status=411, outcome="rejected")
            emu._finish_request(rec)
            return
        rec["body"] = body.decode("utf-8", "replace")
        if fault == "reset":
            rec["outcome"] = "reset"
            emu._finish_request(rec)
            self._abort(rst=True)
        if fault in ERROR_FAULTS:
            rec.update(status=int(fault), outcome="fault")
            emu._finish_request(rec)
            if fault == "502":
                self._send(502, _HTML_502, "text/html; charset=UTF-8")
            elif fault == "429" and seconds > 0:  # inject("429", seconds=N): a quota error with Retry-After
                status, reply = _FAULT_REPLIES[fault]
                self._send(status, json.dumps(reply, ensure_ascii=False, indent=2) + "\n", "application/json; charset=UTF-8",
                           {"Retry-After": f"{seconds:g}"})
            else:
                self._send_json(*_FAULT_REPLIES[fault])
            return
        delay = (seconds if fault == "stall" else 0.0) + max(0.0, float(emu.latency or 0.0))
        if delay > 0 and stop_event.wait(delay):
            rec["outcome"] = "reset"
            emu._finish_request(rec)
            self._abort(rst=True)
        # Validation needs no state: do it outside the lock, report it in order.
        parsed, problem = validate_message(body, emu.strict)
        status, reply, stored = emu._decide(space, query, arrival, parsed, problem, rec)
        if fault == "lost_reply":
            rec.update(status=None, outcome="lost_reply")
            emu._finish_request(rec, stored)
            self._abort(rst=False)
        emu._finish_request(rec, stored)
        self._send_json(status, reply)


def _redacted_query(query: dict) -> dict:
    out: dict[str, Any] = {}
    for k, vs in query.items():
        vs = [REDACTED if k.lower() in ("key", "token") else redact(v) for v in vs]
        out[k] = vs[0] if len(vs) == 1 else vs
    return out


# --------------------------------------------------------------------------- emulator


class Emulator:
    """A Google Chat incoming-webhook endpoint on a loopback address.

    >>> with Emulator(qps=None) as emu:
    ...     url = emu.webhook_url("AAAA")
    ...     # requests.post(url, json={"text": "hi"}) -> 200, then emu.messages()

    Parameters: ``key``/``token`` (when given, only they are accepted; else any
    non-empty ones), ``qps`` (accepted creates per second per space, ``None``
    disables the quota), ``strict`` (schema, webhook-only fields and card
    rules; size, emptiness and the 4,096-character limit are always checked),
    ``latency`` (seconds added to every create; settable at run time),
    ``host`` (loopback only), ``port`` (0: a free port), ``seed`` (for
    probabilistic faults and ids).

    Thread-safe: one lock guards all state. ``on_message``, if set to a
    callable, is called (outside the lock, in the request's thread) with a copy
    of each stored message.
    """

    def __init__(
        self,
        key: str | None = None,
        token: str | None = None,
        qps: float | None = 1.0,
        strict: bool = True,
        latency: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ):
        if not is_loopback(host):
            raise ValueError(f"the emulator only listens on a loopback address, not {host!r}")
        if qps is not None and not qps > 0:
            raise ValueError("qps must be a positive number, or None to disable the quota")
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self.key = key
        self.token = token
        self.qps = qps
        self.strict = strict
        self.latency = latency
        self.host = host
        self.port = port
        self.seed = seed
        self.on_message: Callable[[dict], Any] | None = None
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._connections: set[socket.socket] = set()
        self._down = False
        self._clear_state()

    # -- lifecycle

    def _clear_state(self) -> None:
        self._messages: list[dict] = []
        self._records: list[dict] = []
        self._thread_names: set[str] = set()
        self._thread_keys: dict[tuple[str, str, str], str] = {}
        self._request_ids: dict[tuple[str, str], dict] = {}
        self._message_ids: set[str] = set()
        self._senders: dict[str, str] = {}
        self._last_accept: dict[str, float] = {}
        self._faults: list[list] = []  # [name, remaining, seconds]
        self._random_faults: list[tuple[str, float, float]] = []
        self._fault_rng = random.Random(self.seed)
        # ids are unique across emulator runs (a thread name from yesterday's run is not today's);
        # only the faults follow the seed
        self._id_rng = random.SystemRandom()
        self._counts: dict[str, Any] = {
            "requests": 0,
            "created": 0,
            "duplicates_suppressed": 0,
            "rejected": 0,
            "by_status": {},
            "faults": {},
        }

    def start(self) -> Emulator:
        """Listen (on ``port``; after a :meth:`stop`, on the same port again) and serve in a daemon thread."""
        with self._lock:
            if self._server is not None:
                return self
            self._stop_event = threading.Event()
            server = _Server((self.host, self.port), _Handler, self, self._stop_event)
            self._server = server
            self.port = server.server_address[1]
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name=f"chat-emulator-{self.port}"
            )
            self._thread.start()
        if self.strict:  # import the proto module now rather than during the first request
            threading.Thread(target=_proto_message, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection. Messages and records are kept."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            self._stop_event.set()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._drop_connections()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Emulator {self.base_url} {'running' if self.running else 'stopped'}, {len(self._messages)} messages>"

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def webhook_url(self, space: str = DEFAULT_SPACE, key: str | None = None, token: str | None = None) -> str:
        """The webhook URL of ``space`` on this emulator (a local fake; its key and token are not secrets)."""
        key = key if key is not None else (self.key or DEFAULT_KEY)
        token = token if token is not None else (self.token or DEFAULT_TOKEN)
        return f"{self.base_url}/v1/spaces/{space}/messages?key={quote(key, safe='')}&token={quote(token, safe='')}"

    # -- outages and faults

    @property
    def down(self) -> bool:
        return self._down

    def set_down(self, down: bool = True) -> None:
        """Outage mode: while on, every request's connection is reset without an answer."""
        with self._lock:
            self._down = bool(down)
        if down:
            self._drop_connections()

    def inject(self, fault: str | int, count: int = 1, *, probability: float | None = None, seconds: float | None = None) -> None:
        """Queue ``count`` faults for the next create requests (FIFO), or with
        ``probability`` make every following create request draw the fault
        independently (seeded), until :meth:`clear_faults` or :meth:`reset`.

        Faults: "429", "500", "502" (an HTML page, as Google's front end sends),
        "503", "504" (Google's JSON error bodies); "reset" (the request is read,
        then the connection is reset: nothing stored); "lost_reply" (stored,
        then the connection is closed without an answer); "stall" (wait
        ``seconds``, default 30, then answer normally); "down" (the connection
        is reset before the body is read). A "429" with ``seconds`` carries
        ``Retry-After: seconds``.
        """
        fault = str(fault)
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
        secs = float(seconds) if seconds is not None else (DEFAULT_STALL_SECONDS if fault == "stall" else 0.0)
        with self._lock:
            if probability is not None:
                if not 0.0 <= probability <= 1.0:
                    raise ValueError("probability must be between 0 and 1")
                self._random_faults.append((fault, float(probability), secs))
            else:
                if count < 1:
                    raise ValueError("count must be >= 1")
                self._faults.append([fault, int(count), secs])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._random_faults.clear()

    def _take_fault(self) -> tuple[str | None, float]:
        with self._lock:
            if self._faults:
                entry = self._faults[0]
                entry[1] -= 1
                if entry[1] <= 0:
                    self._faults.pop(0)
                return entry[0], entry[2]
            for fault, p, secs in self._random_faults:
                if self._fault_rng.random() < p:
                    return fault, secs
        return None, 0.0

    # -- state

    def reset(self) -> None:
        """Forget messages, threads, request records, faults, quota and outage mode."""
        with self._lock:
            self._down = False
            self._clear_state()
            self._cond.notify_all()

    @staticmethod
    def _space_id(space: str | None) -> str | None:
        if space is None:
            return None
        return space[len("spaces/"):] if space.startswith("spaces/") else space

    def messages(self, space: str | None = None) -> list[dict]:
        """Stored messages (copies) in arrival order, optionally of one space ("AAAA" or "spaces/AAAA")."""
        sid = self._space_id(space)
        with self._lock:
            return [copy.deepcopy(m) for m in self._messages if sid is None or m["_emu"]["space"] == sid]

    def threads(self, space: str | None = None) -> dict[str, list[dict]]:
        """Thread name -> its messages in order (threads in order of their first message)."""
        out: dict[str, list[dict]] = {}
        for m in self.messages(space):
            out.setdefault(m["thread"]["name"], []).append(m)
        return out

    @property
    def requests(self) -> list[dict]:
        """Every webhook API request received, oldest first (``key``/``token`` redacted).

        The emulator's own pages (``GET /``, ``/api/...``, ``/healthz``) are not recorded.
        """
        with self._lock:
            return [copy.deepcopy(r) for r in self._records]

    def stats(self) -> dict:
        """Counts: ``requests``, ``created``, ``duplicates_suppressed``, ``rejected``, each
        HTTP status both at the top level (``"200": n``) and in ``by_status``, and
        ``faults`` injected by kind. Requests dropped without an answer have no status."""
        with self._lock:
            out = copy.deepcopy(self._counts)
            out["messages"] = len(self._messages)
            out.update(out["by_status"])
            return out

    def wait_for(self, n: int, timeout: float = 10, space: str | None = None) -> list[dict]:
        """Block until at least ``n`` messages are stored (in ``space`` if given), return them.

        Raises ``TimeoutError`` if they have not arrived within ``timeout`` seconds.
        """
        sid = self._space_id(space)

        def count() -> int:
            return sum(1 for m in self._messages if sid is None or m["_emu"]["space"] == sid)

        with self._cond:
            if not self._cond.wait_for(lambda: count() >= n, timeout=timeout):
                raise TimeoutError(f"the emulator has {count()} messages, not {n}, after {timeout} s")
        return self.messages(space)

    def _page_state(self) -> dict:
        return {"messages": self.messages(), "stats": self.stats(), "base_url": self.base_url}

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def _drop_connections(self) -> None:
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _finish_request(self, rec: dict, stored: dict | None = None) -> None:
        """Record a request; ``stored``: the message it created (for ``on_message``)."""
        with self._lock:
            self._records.append(rec)
            self._counts["requests"] += 1
            if rec["status"] is not None:
                key = str(rec["status"])
                self._counts["by_status"][key] = self._counts["by_status"].get(key, 0) + 1
            if rec["fault"]:
                self._counts["faults"][rec["fault"]] = self._counts["faults"].get(rec["fault"], 0) + 1
            if rec["outcome"] == "rejected":
                self._counts["rejected"] += 1
        callback = self.on_message
        if stored is not None and callback is not None:
            try:
                callback(copy.deepcopy(stored))
            except Exception as e:  # a broken callback must not break the server
                _say_line(f"on_message failed: {e!r}", prefix=PREFIX)

    def _new_id(self, taken: set[str] | None = None) -> str:
        while True:
            ident = "".join(self._id_rng.choice(_ID_ALPHABET) for _ in range(11))
            if ident[0].isalnum() and (taken is None or ident not in taken):
                return ident

    def _decide(
        self, space: str, query: dict, arrival: float, parsed: dict | None, problem: tuple | None, rec: dict
    ) -> tuple[int, dict, dict | None]:
        """Authentication, replay, quota, validation, threading, store: returns (status, reply, stored or None).

        The steps run in the order the module docstring gives, each a small
        method over one :class:`_Post`. An accepted message is stored here,
        under the lock, before any answer is sent.
        """
        post = _Post(space, query, arrival, parsed, problem, rec)
        with self._lock:
            refusal = self._check_credentials(post)
            if refusal is None:
                replayed = self._replay(post)
                if replayed is not None:
                    return replayed
                refusal = self._check_quota(post) or post.problem or _check_reply_option(post) or self._check_message_id(post)
            existing_thread = None if refusal is not None else self._existing_thread(post)
            if refusal is None and existing_thread is None and post.option == "REPLY_MESSAGE_OR_FAIL":
                refusal = (404, _NOT_FOUND)
            if refusal is not None:
                rec.update(status=refusal[0], outcome="rejected")
                return refusal[0], refusal[1], None
            thread = existing_thread or self._new_thread(post)
            msg = self._store(post, self._new_message_name(post, thread, reply=existing_thread is not None), thread,
                              reply=existing_thread is not None)
            return 200, _public(msg), msg

    # -- the steps of _decide, in order (under the lock) --------------------------------

    def _check_credentials(self, post: _Post) -> tuple[int, dict] | None:
        """The ``key`` (400), then the ``token`` (403)."""
        key, token = post.arg("key"), post.token
        if not key or (self.key is not None and key != self.key):
            return 400, _API_KEY_INVALID
        if not token or (self.token is not None and token != self.token):
            return 403, _PERMISSION_DENIED
        return None

    def _replay(self, post: _Post) -> tuple[int, dict, None] | None:
        """A ``requestId`` that already names a message in the space: that message, stored once."""
        if post.request_id is None:
            return None
        existing = self._request_ids.get((post.space, post.request_id))
        if existing is None:
            return None
        self._counts["duplicates_suppressed"] += 1
        post.rec.update(status=200, outcome="duplicate", message=existing["name"])
        return 200, _public(existing), None

    def _check_quota(self, post: _Post) -> tuple[int, dict] | None:
        """429 when the space accepted a message less than ``1 / qps`` before this one arrived."""
        interval = 1.0 / self.qps if self.qps else 0.0
        last = self._last_accept.get(post.space)
        if interval and last is not None and post.arrival < last + interval:
            return 429, _QUOTA
        return None

    def _check_message_id(self, post: _Post) -> tuple[int, dict] | None:
        """A ``messageId`` must look like ``client-...`` (400) and be new in the space (409)."""
        message_id = post.message_id
        if message_id is None:
            return None
        if not _CLIENT_MESSAGE_ID.match(message_id):
            return 400, error_body(400, "INVALID_ARGUMENT", "Invalid message ID: a custom ID starts with client-, has at most "
                                                            "63 characters of lowercase letters, digits and hyphens.")
        if f"spaces/{post.space}/messages/{message_id}" in self._message_ids:
            return 409, error_body(409, "ALREADY_EXISTS", "Message with the given ID already exists.")
        return None

    def _existing_thread(self, post: _Post) -> str | None:
        """The thread a reply option points at (by name, else by this webhook's key), if it exists."""
        if post.option == "MESSAGE_REPLY_OPTION_UNSPECIFIED":
            return None
        name = post.thread_name
        if name and name.startswith(f"spaces/{post.space}/threads/") and name in self._thread_names:
            return name
        if post.thread_key:
            return self._thread_keys.get((post.space, post.token, post.thread_key))  # thread keys are per webhook
        return None

    def _new_thread(self, post: _Post) -> str:
        """Reserve a new thread; its key names it from now on (``REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD``)."""
        taken = {n.rsplit("/", 1)[1] for n in self._thread_names}
        thread = f"spaces/{post.space}/threads/{self._new_id(taken)}"
        self._thread_names.add(thread)
        if post.thread_key and post.option == "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD":
            self._thread_keys[(post.space, post.token, post.thread_key)] = thread
        return thread

    def _new_message_name(self, post: _Post, thread: str, *, reply: bool) -> str:
        """The client's ``messageId``, else ``T.T`` for a thread's first message, else a new ``M.T``."""
        thread_id = thread.rsplit("/", 1)[1]
        if post.message_id is not None:
            return f"spaces/{post.space}/messages/{post.message_id}"
        if not reply:
            return f"spaces/{post.space}/messages/{thread_id}.{thread_id}"
        while True:
            name = f"spaces/{post.space}/messages/{self._new_id()}.{thread_id}"
            if name not in self._message_ids:
                return name

    def _store(self, post: _Post, name: str, thread: str, *, reply: bool) -> dict[str, Any]:
        """Keep the accepted message (it takes the quota slot) and wake whoever waits for it."""
        assert post.parsed is not None
        self._message_ids.add(name)
        self._last_accept[post.space] = post.arrival
        sender = self._senders.setdefault(post.token, f"users/{114000000000000000000 + len(self._senders) + 1}")
        msg: dict[str, Any] = {
            "name": name,
            "sender": {"name": sender, "displayName": "Webhook", "type": "BOT"},
            "createTime": _rfc3339(time.time()),
        }
        for field in ("text", "cardsV2", "cards", "fallbackText", "accessoryWidgets"):
            if field in post.parsed:
                msg[field] = copy.deepcopy(post.parsed[field])
        msg["thread"] = {"name": thread}
        if post.thread_key:
            msg["thread"]["threadKey"] = post.thread_key
        msg["space"] = {"name": f"spaces/{post.space}"}
        if reply:
            msg["threadReply"] = True
        if post.message_id is not None:
            msg["clientAssignedMessageId"] = post.message_id
        msg["_emu"] = {"requestId": post.request_id, "messageReplyOption": post.option, "space": post.space,
                       "received_at": post.rec["time"]}
        if post.request_id is not None:
            self._request_ids[(post.space, post.request_id)] = msg
        self._messages.append(msg)
        self._counts["created"] += 1
        self._cond.notify_all()
        post.rec.update(status=200, outcome="created", message=name)
        return msg


@dataclass
class _Post:
    """One ``POST .../messages`` as :meth:`Emulator._decide` weighs it: where, when, what it asks."""

    space: str
    query: dict[str, list[str]]
    arrival: float  # time.monotonic() when it arrived (the quota's clock)
    parsed: dict[str, Any] | None  # the body, when it is a valid Message
    problem: tuple[int, dict] | None  # (status, error body) when it is not
    rec: dict[str, Any]  # the request's record (web view, ``requests``)

    def arg(self, name: str) -> str | None:
        """A query parameter's last value."""
        values = self.query.get(name)
        return values[-1] if values else None

    @property
    def token(self) -> str:
        return self.arg("token") or ""  # also the webhook's identity: its sender and its thread keys

    @property
    def request_id(self) -> str | None:
        return self.arg("requestId") or None

    @property
    def option(self) -> str:
        return self.arg("messageReplyOption") or "MESSAGE_REPLY_OPTION_UNSPECIFIED"

    @property
    def message_id(self) -> str | None:
        return self.arg("messageId")

    @property
    def thread_key(self) -> str | None:
        return ((self.parsed or {}).get("thread") or {}).get("threadKey") or self.arg("threadKey") or None

    @property
    def thread_name(self) -> str | None:
        return ((self.parsed or {}).get("thread") or {}).get("name") or None


def _check_reply_option(post: _Post) -> tuple[int, dict] | None:
    """``messageReplyOption`` must be one of the API's names (400)."""
    if post.option in REPLY_OPTIONS:
        return None
    return 400, error_body(400, "INVALID_ARGUMENT", f"Invalid value at 'message_reply_option' "
                           f"(type.googleapis.com/google.chat.v1.CreateMessageRequest.MessageReplyOption), \"{post.option}\"")


def _public(msg: dict) -> dict:
    return {k: copy.deepcopy(v) for k, v in msg.items() if k != "_emu"}


# --------------------------------------------------------------------------- CLI


def _summary(m: dict) -> str:
    text = m.get("text") or ""
    if not text and m.get("cardsV2"):
        c = m["cardsV2"][0] if isinstance(m["cardsV2"][0], dict) else {}
        title = ((c.get("card") or {}).get("header") or {}).get("title") or c.get("cardId") or ""
        text = f"[card] {title}"
    text = " ".join(text.split())
    return text[:80] + ("…" if len(text) > 80 else "")


def main(argv: list[str] | None = None, *, prog: str = "python -m chat_magic.emulator") -> int:
    """``chat-magic emulator``: run the emulator in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A local Google Chat incoming-webhook emulator, for tests and demos.",
        epilog=(
            "On start it prints its webhook URL, one line: 'Google Chat emulator: webhook URL "
            "http://127.0.0.1:PORT/v1/spaces/SPACE/messages?key=...&token=...' (a local fake: its key and token are "
            "not secrets). Point chat_magic at it with export GOOGLE_CHAT_WEBHOOK_URL='<that URL>'. Then it prints "
            "one line per message it accepts; the web view is at http://127.0.0.1:PORT/. Ctrl-C stops it."
        ),
    )
    parser.add_argument("--port", type=int, default=DEFAULT_CLI_PORT, help=f"port (default {DEFAULT_CLI_PORT}; 0: a free port)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)")
    parser.add_argument("--key", default=None, help="the only key accepted (default: any)")
    parser.add_argument("--token", default=None, help="the only token accepted (default: any)")
    parser.add_argument("--space", default=DEFAULT_SPACE, help=f"space id shown in the URL (default {DEFAULT_SPACE})")
    parser.add_argument("--qps", type=float, default=1.0, help="accepted messages per second per space (default 1; 0: no quota)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every message (default 0)")
    parser.add_argument("--no-strict", dest="strict", action="store_false", help="skip the schema and card checks")
    args = parser.parse_args(argv)

    if not is_loopback(args.host):
        _say_line(f"refusing to listen on {args.host}: only a loopback address is allowed", prefix=PREFIX)
        return 2
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.space):
        _say_line(f"invalid space id {args.space!r}", prefix=PREFIX)
        return 2
    try:
        emu = Emulator(
            key=args.key,
            token=args.token,
            qps=args.qps if args.qps and args.qps > 0 else None,
            strict=args.strict,
            latency=max(0.0, args.latency),
            host=args.host,
            port=args.port,
        )
        emu.start()
    except (OSError, ValueError) as e:
        _say_line(f"cannot start on {args.host}:{args.port}: {e}", prefix=PREFIX)
        return 1

    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            try:
                print(line, flush=True)
            except (BrokenPipeError, ValueError):
                pass

    def on_message(m: dict) -> None:
        thread = m["thread"]["name"].rsplit("/", 1)[-1]
        stamp = time.strftime("%H:%M:%S")
        say(f"[{stamp}] spaces/{m['_emu']['space']} thread {thread}: {_summary(m)}")

    # This URL points at the local fake: printing it is the point.
    say(f"Google Chat emulator: webhook URL {emu.webhook_url(args.space)}")
    emu.on_message = on_message

    stop = threading.Event()
    previous = {}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        emu.stop()
    return 0
