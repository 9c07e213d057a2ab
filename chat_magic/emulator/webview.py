"""The emulator's web view: ``GET /`` shows the spaces, threads and messages as Chat would.

Message text is rendered from Chat syntax and card text from Chat's HTML
subset by :mod:`chat_magic.chatsyntax`; every other value that came in a
request is HTML-escaped, so a posted message can never run script in the page.
The page loads nothing from anywhere else (no fonts or scripts; images only
from the ``imageUrl`` a card names, as Chat shows them) and
keeps itself current: a small script polls ``/api/stats`` every second and,
when something changed, fetches the page again and swaps its content in
place. ``/?space=ID`` shows one space.

Threads are ordered by their last message and messages by arrival, newest
last, as in Chat. Each message shows its time, thread (and thread key) and the
``requestId`` it was created with.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from urllib.parse import quote

from ..chatsyntax import card_html, render, safe_url

__all__ = ["render_page", "render_messages", "render_card"]

esc = html.escape
MAX_DEPTH = 4  # columns inside columns: stop somewhere


def _space_of(m: dict) -> str:
    emu = m.get("_emu") or {}
    if emu.get("space"):
        return str(emu["space"])
    for name in ((m.get("space") or {}).get("name"), (m.get("thread") or {}).get("name"), m.get("name")):
        if isinstance(name, str) and name.startswith("spaces/"):
            return name.split("/")[1]
    return "?"


def _short(name: Any) -> str:
    return str(name or "").rsplit("/", 1)[-1]


def _time(stamp: Any) -> tuple[str, str]:
    """(HH:MM:SS in local time, the full timestamp) for an RFC 3339 ``createTime``."""
    s = str(stamp or "")
    if not s:
        return "", ""
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00")).astimezone()
    except ValueError:
        return s, s
    return t.strftime("%H:%M:%S"), s


# --------------------------------------------------------------------------- cards


def _button(b: Any) -> str:
    if not isinstance(b, dict):
        return ""
    label = esc(str(b.get("text") or (b.get("icon") or {}).get("knownIcon") or "button"))
    url = (((b.get("onClick") or {}).get("openLink") or {}).get("url")) or ""
    target = safe_url(str(url)) if url else None
    if target is None:
        return f'<span class="btn btn-off" title="no link">{label}</span>'
    return f'<a class="btn" href="{esc(target)}" target="_blank" rel="noopener noreferrer">{label}</a>'


def _widget(w: Any, depth: int = 0) -> str:
    if not isinstance(w, dict):
        return ""
    if "textParagraph" in w:
        return f'<div class="w-text">{card_html((w["textParagraph"] or {}).get("text", ""))}</div>'
    if "decoratedText" in w:
        d = w["decoratedText"] or {}
        parts = []
        if d.get("topLabel"):
            parts.append(f'<div class="w-label">{card_html(d["topLabel"])}</div>')
        parts.append(f'<div class="w-dtext">{card_html(d.get("text", ""))}</div>')
        if d.get("bottomLabel"):
            parts.append(f'<div class="w-label">{card_html(d["bottomLabel"])}</div>')
        button = _button(d["button"]) if isinstance(d.get("button"), dict) else ""
        return f'<div class="w-decorated"><div class="w-dbody">{"".join(parts)}</div>{button}</div>'
    if "buttonList" in w:
        buttons = "".join(_button(b) for b in (w["buttonList"] or {}).get("buttons") or [])
        return f'<div class="w-buttons">{buttons}</div>'
    if "chipList" in w:
        chips = "".join(_button({"text": c.get("label"), "onClick": c.get("onClick")})
                        for c in (w["chipList"] or {}).get("chips") or [] if isinstance(c, dict))
        return f'<div class="w-buttons">{chips}</div>'
    if "divider" in w:
        return '<hr class="w-divider">'
    if "image" in w:
        img = w["image"] or {}
        url = safe_url(str(img.get("imageUrl") or ""))
        alt = esc(str(img.get("altText") or "image"))
        if url and url.lower().startswith(("https://", "http://")):
            return (f'<div class="w-image"><a href="{esc(url)}" target="_blank" rel="noopener noreferrer">'
                    f'<img class="w-img" src="{esc(url)}" alt="{alt}" loading="lazy" referrerpolicy="no-referrer"></a></div>')
        return f'<div class="w-image">🖼 {alt} <span class="muted">(no image URL)</span></div>'
    if "columns" in w and depth < MAX_DEPTH:
        cols = []
        for col in (w["columns"] or {}).get("columnItems") or []:
            inner = "".join(_widget(x, depth + 1) for x in (col or {}).get("widgets") or [])
            cols.append(f'<div class="w-col">{inner}</div>')
        return f'<div class="w-columns">{"".join(cols)}</div>'
    if "grid" in w:
        g = w["grid"] or {}
        items = "".join(f'<div class="w-cell">{esc(str((i or {}).get("title") or ""))}</div>' for i in g.get("items") or [])
        title = f'<div class="w-label">{esc(str(g.get("title") or ""))}</div>' if g.get("title") else ""
        try:
            columns = max(1, min(12, int(g.get("columnCount") or 0)))
        except (TypeError, ValueError):
            columns = 0
        if g.get("columnCount") and columns:  # a table: its columns line up, as in Chat
            return f'{title}<div class="w-table" style="grid-template-columns:repeat({columns},auto)">{items}</div>'
        return f'{title}<div class="w-grid">{items}</div>'
    name = next(iter(w), "widget")
    return f'<div class="muted">[{esc(str(name))}]</div>'


def render_card(entry: Any) -> str:
    """One ``cardsV2`` entry as HTML."""
    if not isinstance(entry, dict):
        return ""
    card = entry.get("card") or {}
    out = ['<div class="card">']
    header = card.get("header")
    if isinstance(header, dict):
        out.append('<div class="card-head">')
        out.append(f'<div class="card-title">{esc(str(header.get("title") or ""))}</div>')
        if header.get("subtitle"):
            out.append(f'<div class="card-sub">{esc(str(header["subtitle"]))}</div>')
        out.append("</div>")
    for section in card.get("sections") or []:
        if not isinstance(section, dict):
            continue
        out.append('<div class="card-section">')
        if section.get("header"):
            out.append(f'<div class="section-head">{card_html(section["header"])}</div>')
        widgets = [_widget(w) for w in section.get("widgets") or []]
        if section.get("collapsible"):
            try:
                keep = max(0, int(section.get("uncollapsibleWidgetsCount") or 0))
            except (TypeError, ValueError):
                keep = 0
            out.extend(widgets[:keep])
            if widgets[keep:]:
                out.append(f'<details><summary>Show more</summary>{"".join(widgets[keep:])}</details>')
        else:
            out.extend(widgets)
        out.append("</div>")
    out.append("</div>")
    return "".join(out)


# --------------------------------------------------------------------------- messages


def _message(m: dict) -> str:
    when, full = _time(m.get("createTime"))
    emu = m.get("_emu") or {}
    thread = m.get("thread") or {}
    sender = (m.get("sender") or {}).get("displayName") or "Webhook"
    body = []
    if m.get("text"):
        body.append(f'<div class="text">{render(str(m["text"]))}</div>')
    for entry in m.get("cardsV2") or []:
        body.append(render_card(entry))
    if m.get("cards") and not m.get("cardsV2"):
        body.append('<div class="muted">[legacy cards]</div>')
    if m.get("accessoryWidgets"):
        body.append("".join(_widget(w) for w in m["accessoryWidgets"]))
    meta = [f'thread <span class="mono">{esc(_short(thread.get("name")))}</span>']
    if thread.get("threadKey"):
        meta.append(f'key <span class="mono">{esc(str(thread["threadKey"]))}</span>')
    meta.append(f'requestId <span class="mono">{esc(str(emu.get("requestId") or "none"))}</span>')
    meta.append(f'<span class="mono">{esc(_short(m.get("name")))}</span>')
    fallback = ""
    if m.get("fallbackText") and m.get("cardsV2"):
        fallback = f'<div class="meta">fallback: {esc(str(m["fallbackText"]))}</div>'
    initial = esc(sender[:1].upper() or "W")
    return (
        f'<div class="msg" data-name="{esc(str(m.get("name") or ""))}">'
        f'<div class="avatar">{initial}</div><div class="msg-main">'
        f'<div class="msg-head"><span class="sender">{esc(str(sender))}</span><span class="badge">App</span>'
        f'<span class="when" title="{esc(full)}">{esc(when)}</span></div>'
        f'{"".join(body)}{fallback}<div class="meta">{" · ".join(meta)}</div>'
        "</div></div>"
    )


def _group(messages: Iterable[dict]) -> dict[str, dict[str, list[dict]]]:
    """space -> thread -> messages, spaces and threads ordered by their last message."""
    spaces: dict[str, dict[str, list[dict]]] = {}
    for m in messages:
        if not isinstance(m, dict):
            continue
        space = _space_of(m)
        thread = str((m.get("thread") or {}).get("name") or m.get("name") or "")
        threads = spaces.pop(space, {})
        msgs = threads.pop(thread, [])
        msgs.append(m)
        threads[thread] = msgs  # re-inserted: the most recent goes last
        spaces[space] = threads
    return spaces


def render_messages(messages: list[dict], space: str | None = None) -> str:
    """The main pane: each space's threads, newest last."""
    grouped = _group(messages)
    if space is not None:
        grouped = {space: grouped.get(space, {})}
    if not any(grouped.values()):
        where = f" in spaces/{esc(space)}" if space else ""
        return f'<div class="empty">No messages{where} yet. Post to a webhook URL of this emulator and they show here.</div>'
    out = []
    for sid, threads in grouped.items():
        n = sum(len(v) for v in threads.values())
        out.append(f'<section class="space"><h2>spaces/{esc(sid)} <span class="muted">{n} message{"s" if n != 1 else ""}, '
                   f'{len(threads)} thread{"s" if len(threads) != 1 else ""}</span></h2>')
        for thread, msgs in threads.items():
            replies = len(msgs) - 1
            out.append(f'<div class="thread" data-thread="{esc(thread)}">')
            out.append(_message(msgs[0]))
            if replies:
                out.append(f'<div class="replies"><div class="replies-count">{replies} repl{"ies" if replies != 1 else "y"}</div>')
                out.extend(_message(m) for m in msgs[1:])
                out.append("</div>")
            out.append("</div>")
        out.append("</section>")
    return "".join(out)


def _sidebar(messages: list[dict], current: str | None) -> str:
    counts: dict[str, int] = {}
    for m in messages:
        if isinstance(m, dict):
            s = _space_of(m)
            counts[s] = counts.get(s, 0) + 1
    items = [f'<a class="nav{" on" if current is None else ""}" href="/">All spaces <span class="count">{len(messages)}</span></a>']
    for sid in sorted(counts):
        on = " on" if sid == current else ""
        items.append(f'<a class="nav{on}" href="/?space={esc(quote(sid))}"># {esc(sid)} <span class="count">{counts[sid]}</span></a>')
    return "".join(items)


def _stats_line(state: dict) -> str:
    stats = state.get("stats") or {}
    parts = [f'{esc(str(stats.get("messages", len(state.get("messages") or []))))} messages',
             f'{esc(str(stats.get("requests", 0)))} requests']
    for key, label in (("rejected", "rejected"), ("duplicates_suppressed", "duplicates suppressed")):
        if stats.get(key):
            parts.append(f"{esc(str(stats[key]))} {label}")
    faults = stats.get("faults") or {}
    if faults:
        parts.append("faults " + ", ".join(f"{esc(str(k))}×{esc(str(v))}" for k, v in faults.items()))
    return " · ".join(parts)


_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/20px Roboto,"Google Sans","Segoe UI",Arial,sans-serif;color:#1f1f1f;background:#f8fafd}
header{position:sticky;top:0;z-index:2;display:flex;align-items:center;gap:16px;padding:10px 20px;background:#f8fafd;border-bottom:1px solid #e3e3e3}
header h1{margin:0;font-size:18px;font-weight:500}
header .info{color:#5f6368;font-size:13px}
#live{margin-left:auto;font-size:12px;color:#188038}
#live.off{color:#d93025}
.layout{display:flex;min-height:calc(100vh - 49px)}
nav{width:230px;flex:none;padding:12px 8px;border-right:1px solid #e3e3e3}
.nav{display:flex;justify-content:space-between;padding:6px 12px;border-radius:16px;color:#1f1f1f;text-decoration:none;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.nav:hover{background:#e9eef6}.nav.on{background:#d3e3fd;font-weight:500}
.count{color:#5f6368;font-size:12px;margin-left:8px}
main{flex:1;min-width:0;padding:16px 24px 48px;background:#fff}
.space h2{font-size:15px;font-weight:500;margin:8px 0 12px}
.thread{border:1px solid #e3e3e3;border-radius:12px;padding:4px 0;margin:0 0 14px;max-width:900px;background:#fff}
.replies{margin-left:52px;border-left:2px solid #e3e3e3}
.replies .msg{padding-left:12px}
.replies-count{font-size:12px;color:#0b57d0;padding:2px 12px;font-weight:500}
.msg{display:flex;gap:12px;padding:8px 16px}
.avatar{flex:none;width:32px;height:32px;border-radius:50%;background:#1a73e8;color:#fff;display:flex;align-items:center;justify-content:center;font-weight:500}
.msg-main{min-width:0;flex:1}
.msg-head{display:flex;align-items:baseline;gap:6px}
.sender{font-weight:500}
.badge{font-size:11px;color:#444746;background:#e9eef6;border-radius:4px;padding:0 4px}
.when{font-size:12px;color:#5f6368}
.text{white-space:normal;overflow-wrap:anywhere;margin-top:2px}
.meta{font-size:11px;color:#80868b;margin-top:4px;overflow-wrap:anywhere}
.mono,.cm-code,code,pre{font-family:"Roboto Mono",Menlo,Consolas,monospace}
code.cm-code{font-size:13px;background:#f1f3f4;border-radius:4px;padding:0 4px}
pre.cm-code,.card pre{font-size:12px;background:#f1f3f4;border-radius:6px;padding:8px 10px;margin:4px 0;white-space:pre-wrap;overflow-wrap:anywhere}
.cm-mention{color:#0b57d0;background:#d3e3fd;border-radius:10px;padding:0 6px;font-weight:500}
a{color:#0b57d0}
.card{border:1px solid #dadce0;border-radius:12px;margin:6px 0;max-width:640px;background:#fff;box-shadow:0 1px 2px rgba(60,64,67,.15)}
.card-head{padding:12px 16px;border-bottom:1px solid #e3e3e3}
.card-title{font-size:16px;font-weight:500}
.card-sub{font-size:13px;color:#5f6368}
.card-section{padding:8px 16px;border-bottom:1px solid #f1f3f4}
.card-section:last-child{border-bottom:0}
.section-head{font-size:13px;font-weight:500;color:#444746;margin:2px 0 6px}
.w-label{font-size:12px;color:#5f6368}
.w-decorated{display:flex;align-items:center;gap:8px;margin:6px 0}.w-dbody{flex:1;min-width:0}
.w-text{margin:6px 0;overflow-wrap:anywhere}
.w-buttons{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}
.btn{display:inline-block;padding:6px 16px;border-radius:18px;border:1px solid #747775;color:#0b57d0;text-decoration:none;font-weight:500}
.btn:hover{background:#f1f6fe}.btn-off{color:#80868b;border-color:#dadce0}
.w-columns{display:flex;gap:16px}.w-col{flex:1;min-width:0}
.w-grid{display:flex;flex-wrap:wrap;gap:8px}.w-table{display:grid;gap:2px;justify-content:start}.w-table .w-cell{border-radius:2px;font-variant-numeric:tabular-nums}.w-img{max-width:100%;max-height:420px;border-radius:8px;display:block}.w-cell{border:1px solid #e3e3e3;border-radius:8px;padding:4px 8px}
.w-divider{border:0;border-top:1px solid #e3e3e3;margin:8px 0}
details summary{cursor:pointer;color:#0b57d0;font-size:13px;margin:4px 0}
.muted{color:#80868b;font-weight:400;font-size:12px}
.empty{color:#5f6368;padding:40px 0;text-align:center}
"""

# Polls /api/stats; when anything changed, fetches this same URL and swaps the
# content. DOMParser builds an inert document (no script runs in it); the
# swapped-in markup was escaped on the server.
_JS = """
(function () {
  var last = null, busy = false, live = document.getElementById('live');
  function nearBottom() { return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80; }
  function swap(text) {
    var doc = new DOMParser().parseFromString(text, 'text/html');
    var stick = nearBottom();
    ['side', 'content', 'stats'].forEach(function (id) {
      var now = document.getElementById(id), next = doc.getElementById(id);
      if (now && next) { now.replaceWith(document.importNode(next, true)); }
    });
    if (stick) { window.scrollTo(0, document.body.scrollHeight); }
  }
  function tick() {
    if (busy) { return; }
    busy = true;
    fetch('/api/stats', {cache: 'no-store'}).then(function (r) { return r.json(); }).then(function (s) {
      var key = JSON.stringify(s);
      live.textContent = '\\u25cf live'; live.className = '';
      if (last !== null && key !== last) {
        return fetch(window.location.href, {cache: 'no-store'}).then(function (r) { return r.text(); })
          .then(function (t) { swap(t); last = key; });
      }
      last = key;
    }).catch(function () { live.textContent = '\\u25cf offline'; live.className = 'off'; })
      .then(function () { busy = false; });
  }
  window.scrollTo(0, document.body.scrollHeight);
  tick();
  setInterval(tick, 1000);
})();
"""


def render_page(state: dict, space: str | None = None) -> str:
    """The whole page for ``state`` (``{"messages": [...], "stats": {...}, "base_url": str}``).

    ``space``: show only that space (``"AAAA"`` or ``"spaces/AAAA"``).
    """
    messages = [m for m in state.get("messages") or [] if isinstance(m, dict)]
    if space:
        space = space[len("spaces/"):] if space.startswith("spaces/") else space
    title = f"spaces/{space} · Google Chat emulator" if space else "Google Chat emulator"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n"
        "<header><h1>Google Chat emulator</h1>"
        f"<span class=\"info\">{esc(str(state.get('base_url') or ''))}</span>"
        f"<span class=\"info\" id=\"stats\">{_stats_line(state)}</span>"
        "<span id=\"live\">\u25cf</span></header>\n"
        f"<div class=\"layout\"><nav id=\"side\">{_sidebar(messages, space or None)}</nav>"
        f"<main id=\"content\">{render_messages(messages, space or None)}</main></div>\n"
        f"<script>{_JS}</script>\n</body></html>\n"
    )
