"""A message composer for notebooks: type, preview as Chat shows it, send.

    from chat_magic import Composer
    Composer()                      # or: %chat_compose

``Composer`` is an ipywidgets ``VBox``: a destination (the default webhook or
a named space from the config file; names only, never URLs), a thread choice
(the session's thread, a new thread, or a custom key), a text box, a live
preview of the Chat syntax, a Send button, a status line and the last sends.

Sending never blocks the kernel: the click queues the message in the outbox
and returns; the background worker delivers it and calls back, and the status
line changes from ``queued`` to ``delivered: spaces/…/messages/…`` or
``failed: <reason>``. A mistake in the set-up (no webhook configured) shows in
the status line at once and the typed text stays in the box. Outside a
notebook the composer prints a short text summary instead.
"""

from __future__ import annotations

import html
import os
import secrets
import threading
import time
from typing import Any, NoReturn

import ipywidgets as widgets

from . import config
from .chatsyntax import render
from .errors import ChatMagicError, ConfigError, NoDestinationError
from .webhook import redact

__all__ = ["Composer", "compose_magic"]

SESSION, NEW, CUSTOM = "session", "new", "custom"
THREAD_CHOICES = (("session thread", SESSION), ("new thread", NEW), ("custom key", CUSTOM))
DEFAULT = ""  # the dropdown value of the default destination
QUEUED, DELIVERED, FAILED = "queued", "delivered", "failed"
_STATUS_COLORS = {QUEUED: "#5f6368", DELIVERED: "#188038", FAILED: "#d93025"}
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
_HELP = "Chat syntax: *bold* _italic_ ~strike~ `code` ```block``` <https://example.com|link> <users/all>"

_CSS = """<style>
.chat-magic-composer { max-width: 760px; }
.chat-magic-composer .cm-bubble { font-family: Roboto, "Segoe UI", Arial, sans-serif; font-size: 14px;
  line-height: 20px; color: #1f1f1f; background: #f2f6fc; border-radius: 12px; padding: 8px 12px;
  min-height: 20px; white-space: normal; overflow-wrap: anywhere; }
.chat-magic-composer .cm-empty { color: #80868b; font-style: italic; }
.chat-magic-composer .cm-code { font-family: "Roboto Mono", Menlo, Consolas, monospace; font-size: 13px;
  background: #e8eaed; border-radius: 4px; }
.chat-magic-composer code.cm-code { padding: 0 4px; }
.chat-magic-composer pre.cm-code { padding: 8px 10px; margin: 4px 0; white-space: pre-wrap; }
.chat-magic-composer .cm-mention { color: #0b57d0; background: #d3e3fd; border-radius: 10px; padding: 0 6px;
  font-weight: 500; }
.chat-magic-composer a { color: #0b57d0; text-decoration: underline; }
.chat-magic-composer .cm-history { font-size: 12px; line-height: 18px; color: #444746; }
.chat-magic-composer .cm-history-title { font-weight: 500; color: #5f6368; }
.chat-magic-composer .cm-history-box, .chat-magic-composer .cm-history-box > .widget-html-content { min-width: 0; max-width: 100%; }
.chat-magic-composer .cm-row { display: flex; gap: 10px; white-space: nowrap; min-width: 0; max-width: 100%; }
.chat-magic-composer .cm-row span { overflow: hidden; text-overflow: ellipsis; }
.chat-magic-composer .cm-row .cm-t { flex: none; color: #80868b; }
.chat-magic-composer .cm-row .cm-s { flex: 0 1 auto; max-width: 45%; }
.chat-magic-composer .cm-row .cm-w { flex: 0 1 auto; max-width: 30%; color: #5f6368; }
.chat-magic-composer .cm-row .cm-x { flex: 1 1 0; min-width: 60px; }
.chat-magic-composer .cm-help { font-size: 12px; color: #5f6368; }
.chat-magic-composer .cm-status { flex: 1 1 auto; min-width: 0; height: auto; white-space: normal;
  overflow: visible; text-overflow: clip; overflow-wrap: anywhere; line-height: 1.4; }
</style>"""
# the status line's colour: a CSS class per state works on ipywidgets 7 (whose Label has no text_color) and 8
_CSS = _CSS.replace("</style>", "".join(
    f".chat-magic-composer .cm-status-{state} {{ color: {color}; }}\n" for state, color in _STATUS_COLORS.items()
) + "</style>")


def _destination_options() -> list[tuple[str, str]]:
    """Dropdown entries: (label, value). Labels name where the default comes from; no URL ever."""
    if os.environ.get(config.ENV_URL, "").strip():
        label = f"default ({config.ENV_URL})"
    else:
        try:
            default = config.load_config().get("default")
        except ConfigError:
            default = None
        label = f"default ({default})" if default else "default"
    try:
        names = config.destination_names()
    except ConfigError:
        names = []
    return [(label, DEFAULT)] + [(n, n) for n in names]


def _new_thread_key() -> str:
    return f"chat-magic-compose-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def _snippet(text: str, limit: int = 60) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


class Composer(widgets.VBox):
    """A widget to write a message in Chat syntax, preview it and send it without blocking.

    Public parts: ``message`` (Textarea), ``destination`` (Dropdown),
    ``thread`` (ToggleButtons: ``"session"``, ``"new"``, ``"custom"``),
    ``thread_key`` (Text, for the custom key), ``send_button``, ``preview``
    (HTML), ``status`` (Label: ``"queued"``, ``"delivered: spaces/…/messages/…"``
    or ``"failed: <reason>"``) and ``history`` (HTML: the last sends).
    """

    def __init__(
        self,
        *,
        to: str | None = None,
        thread: str = SESSION,
        thread_key: str = "",
        history_size: int = 5,
        shell: Any = None,
        **kwargs: Any,
    ) -> None:
        if thread not in {v for _, v in THREAD_CHOICES}:
            raise ConfigError(f"thread must be one of {', '.join(v for _, v in THREAD_CHOICES)}, not {thread!r}")
        options = _destination_options()
        if to and to not in [v for _, v in options]:
            known = ", ".join(v for _, v in options if v) or "none"
            raise NoDestinationError(f"unknown space {to!r} (known: {known}): add [spaces.{to}] with webhook_url to {config.config_path()}")

        self._shell = shell  # an IPython shell, for the session (default: the running one, if any)
        self._lock = threading.Lock()
        self._pending: Any = None  # the Receipt of the send in flight
        self._entries: list[dict[str, Any]] = []
        self._history_size = max(1, int(history_size))

        self.destination = widgets.Dropdown(options=options, value=to or DEFAULT, description="To",
                                            layout=widgets.Layout(width="auto", min_width="260px"))
        self.thread = widgets.ToggleButtons(options=list(THREAD_CHOICES), value=thread,
                                            style={"button_width": "auto"})
        self.thread_key = widgets.Text(value=thread_key, placeholder="thread key", disabled=thread != CUSTOM,
                                       layout=widgets.Layout(width="200px", display="" if thread == CUSTOM else "none"))
        self.message = widgets.Textarea(placeholder="Write a message…", rows=4, continuous_update=True,
                                        layout=widgets.Layout(width="100%"))
        self.preview = widgets.HTML()
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane",
                                          tooltip="Queue the message; delivery happens in the background",
                                          disabled=True, layout=widgets.Layout(flex="none"))
        self.status = widgets.Label(value="")
        self.status.add_class("cm-status")  # a long reason wraps instead of being cut
        self.history = widgets.HTML(layout=widgets.Layout(width="100%", max_width="100%", min_width="0"))
        # its rows keep to the composer's width (long parts end in an ellipsis): the widget's inner box would
        # otherwise grow to the rows' full unwrapped width, past the composer's edge
        self.history.add_class("cm-history-box")
        help_line = widgets.HTML(f'<span class="cm-help">{html.escape(_HELP)}</span>')

        super().__init__(
            children=[
                widgets.HTML(_CSS),
                widgets.HBox([self.destination, self.thread, self.thread_key],
                             layout=widgets.Layout(flex_flow="row wrap", align_items="center")),
                self.message,
                help_line,
                self.preview,
                widgets.HBox([self.send_button, self.status], layout=widgets.Layout(align_items="center")),
                self.history,
            ],
            **kwargs,
        )
        self.add_class("chat-magic-composer")

        self.message.observe(self._on_text, names="value")
        self.thread.observe(self._on_thread, names="value")
        self.thread_key.observe(self._on_text, names="value")
        self.send_button.on_click(self._on_send)
        self._on_text()
        self._render_history()

    # -- reactions ----------------------------------------------------------

    def _on_text(self, change: Any = None) -> None:
        text = self.message.value
        if text.strip():
            self.preview.value = f'<div class="cm-bubble">{render(text)}</div>'
        else:
            self.preview.value = '<div class="cm-bubble cm-empty">The preview shows here as Chat will show it.</div>'
        self._update_button()

    def _on_thread(self, change: Any = None) -> None:
        custom = self.thread.value == CUSTOM
        self.thread_key.disabled = not custom
        self.thread_key.layout.display = "" if custom else "none"
        self._update_button()

    def _update_button(self) -> None:
        ready = bool(self.message.value.strip())
        if self.thread.value == CUSTOM and not self.thread_key.value.strip():
            ready = False
        self.send_button.disabled = not ready or self._pending is not None

    def _set_status(self, state: str, detail: str = "") -> None:
        for name in _STATUS_COLORS:
            self.status.remove_class(f"cm-status-{name}")
        self.status.add_class(f"cm-status-{state}")
        self.status.value = f"{state}: {detail}" if detail else state

    # -- sending ------------------------------------------------------------

    def refresh(self) -> None:
        """Read the destinations again (after editing the config file)."""
        current = self.destination.value
        options = _destination_options()
        self.destination.options = options
        self.destination.value = current if current in [v for _, v in options] else DEFAULT

    def _queue(self, text: str) -> tuple[Any, str]:
        """Queue ``text``; return the receipt and where it went (for the history)."""
        from .delivery import send
        from .session import current_session

        to = self.destination.value or None
        choice = self.thread.value
        if choice == SESSION:
            ip = self._shell
            if ip is None:
                try:
                    from IPython import get_ipython

                    ip = get_ipython()
                except ImportError:
                    ip = None
            session = current_session(getattr(ip, "user_ns", None))
            return session.send(text, to=to), "session thread"
        key = _new_thread_key() if choice == NEW else self.thread_key.value.strip()
        receipt = send(text, to=to, thread_key=key)
        if choice == NEW:
            self.thread_key.value = key  # so "custom key" can continue that thread
        return receipt, f"thread {key}"

    def _on_send(self, button: Any = None) -> None:
        text = self.message.value
        with self._lock:
            if not text.strip() or self._pending is not None:
                return
            if self.thread.value == CUSTOM and not self.thread_key.value.strip():
                return
            self._pending = True  # claimed before the (quick) queueing, so a double click sends once
        self._update_button()
        entry = {"time": time.strftime("%H:%M:%S"), "text": text, "to": self.destination.label or "default",
                 "where": "", "state": QUEUED, "detail": ""}
        try:
            receipt, entry["where"] = self._queue(text)
        except Exception as e:  # a set-up mistake: show it, keep the text, never raise into the frontend
            reason = redact(e) if isinstance(e, ChatMagicError) else redact(f"{type(e).__name__}: {e}")
            with self._lock:
                self._pending = None
            entry.update(state=FAILED, detail=reason, where=self._where_label())
            self._set_status(FAILED, reason)
            self._add_entry(entry)
            self._update_button()
            return
        with self._lock:
            self._pending = receipt
        self.message.value = ""
        self._set_status(QUEUED)
        self._add_entry(entry)
        receipt.add_done_callback(lambda r: self._on_done(r, entry))

    def _where_label(self) -> str:
        choice = self.thread.value
        if choice == CUSTOM:
            return f"thread {self.thread_key.value.strip()}"
        return {v: k for k, v in THREAD_CHOICES}[choice]

    def _on_done(self, receipt: Any, entry: dict[str, Any]) -> None:
        """Called from the delivery thread once the message is sent or has failed."""
        if receipt.status == "sent":
            names = [d.name for d in receipt.results() if d.name]
            detail = names[0] if names else ""
            if len(names) > 1:
                detail += f" (+{len(names) - 1} more parts)"
            entry.update(state=DELIVERED, detail=detail)
        else:
            entry.update(state=FAILED, detail=redact(receipt.error or "not delivered"))
        with self._lock:
            if self._pending is receipt:
                self._pending = None
                current = True
            else:
                current = False
        if current:
            self._set_status(entry["state"], entry["detail"])
            if entry["state"] == FAILED and not self.message.value.strip():
                self.message.value = entry["text"]  # give the text back to fix and resend
        self._render_history()
        self._update_button()

    # -- history ------------------------------------------------------------

    def _add_entry(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._entries.append(entry)
            del self._entries[: -self._history_size]
        self._render_history()

    def _render_history(self) -> None:
        with self._lock:
            entries = list(reversed(self._entries))
        if not entries:
            self.history.value = ""
            return
        rows = []
        for e in entries:
            color = _STATUS_COLORS.get(e["state"], "#5f6368")
            full = e["state"] + (f": {e['detail']}" if e["detail"] else "")
            if e["state"] == DELIVERED and e["detail"]:
                short = f"delivered ({e['detail'].split('/messages/')[-1]})"
            else:
                short = full
            where = f"{e['to']} · {e['where']}"
            rows.append(
                '<div class="cm-row">'
                f'<span class="cm-t">{html.escape(e["time"])}</span>'
                f'<span class="cm-s" style="color:{color}" title="{html.escape(full)}">{html.escape(short)}</span>'
                f'<span class="cm-w" title="{html.escape(where)}">{html.escape(where)}</span>'
                f'<span class="cm-x" title="{html.escape(_snippet(e["text"], 300))}">{html.escape(_snippet(e["text"]))}</span>'
                "</div>"
            )
        self.history.value = f'<div class="cm-history"><div class="cm-history-title">Last sends</div>{"".join(rows)}</div>'

    # -- text fallback ------------------------------------------------------

    def summary(self) -> str:
        """What the composer shows, as plain text (for terminals)."""
        text = self.message.value
        lines = [
            "chat_magic Composer (a widget: display it in Jupyter to type and send)",
            f"  to: {self.destination.label or 'default'} · thread: {self._where_label()}",
            f"  message: {_snippet(text) + f' ({len(text)} characters)' if text.strip() else '(empty)'}",
            f"  status: {self.status.value or 'nothing sent yet'}",
        ]
        with self._lock:
            entries = list(reversed(self._entries))
        if entries:
            lines.append("  last sends:")
            for e in entries:
                status = e["state"] + (f": {e['detail']}" if e["detail"] else "")
                lines.append(f"    {e['time']}  {status}  {_snippet(e['text'], 40)!r}")
        lines.append('  in a terminal: chat_magic.send("text") or %chat')
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widget view plus the whole text summary (ipywidgets cuts its own text/plain at 110 characters)."""
        data: dict[str, Any] = {"text/plain": self.summary()}
        if self._view_name is not None:
            data[_WIDGET_MIME] = {"version_major": 2, "version_minor": 0, "model_id": self._model_id}
        return data

    if hasattr(widgets.Widget, "_ipython_display_"):  # ipywidgets 7 displays through this hook, not the bundle

        def _ipython_display_(self, **kwargs: Any) -> None:
            from IPython.display import display

            display(self._repr_mimebundle_(), raw=True)
            self._handle_displayed(**kwargs)


def compose_magic(line: str = "", shell: Any = None) -> Composer:
    """``%chat_compose [--to SPACE] [--thread session|new|custom] [--key KEY]``: a :class:`Composer`.

    A user's mistake raises IPython's ``UsageError`` (one line, no traceback).
    """
    import argparse
    import shlex

    from IPython.core.error import UsageError

    usage = "%chat_compose [--to SPACE] [--thread session|new|custom] [--key KEY]"

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # type: ignore[override]
            raise UsageError(f"%chat_compose: {message}; usage: {usage}")

    parser = Parser(prog="%chat_compose", add_help=False)
    parser.add_argument("--to", default=None)
    parser.add_argument("--thread", default=SESSION, choices=[v for _, v in THREAD_CHOICES])
    parser.add_argument("--key", default="")
    try:
        args = parser.parse_args(shlex.split(line or ""))
    except ValueError as e:  # shlex: an unclosed quote
        raise UsageError(f"%chat_compose: {e}; usage: {usage}") from None
    thread = CUSTOM if args.key and args.thread == SESSION else args.thread
    try:
        return Composer(to=args.to, thread=thread, thread_key=args.key, shell=shell)
    except ChatMagicError as e:
        raise UsageError(f"%chat_compose: {redact(e)}") from None
