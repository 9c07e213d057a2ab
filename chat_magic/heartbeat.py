"""Every open block's record and heartbeat in Redis, for ``chat-magic watch`` (:mod:`chat_magic.lost`).

With ``CHAT_MAGIC_REDIS_URL`` (or ``redis_url`` in the config), every open
block writes to Redis:

- ``chat_magic:open:<host>:<pid>/<start>:<id>``: a hash with its host, label,
  the text of its armed death notice, the destination's *name* (a space name
  from the config, or ``""`` for the default: never a URL, key or token),
  its thread key, when it started, its last progress line and last beat;
- ``chat_magic:beat:<same>``: a heartbeat, refreshed every
  ``CHAT_MAGIC_HEARTBEAT`` seconds (default 15) by a daemon thread, that
  expires after three beats missed.

Closing the block deletes both; so does posting its death or termination
notice on the host, in whichever process fires it (:mod:`chat_magic.deadman`
imports this module, so its :func:`on_fired` hook is always in place).
Its hooks are registered in :mod:`chat_magic.hooks` at import; nothing
here imports delivery.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from . import hooks

__all__ = ["KEEP", "PREFIX", "beat_every", "on_arm", "on_close", "on_fired", "redis_client"]

PREFIX = "chat_magic:"
KEEP = 7 * 86400  # a record of a host that never came back is forgotten after a week


def beat_every() -> float:
    """``CHAT_MAGIC_HEARTBEAT``: seconds between two beats (0.2 s to 1 h; default 15); a bad value is one line and 15."""
    from .rules import env_seconds

    return env_seconds("CHAT_MAGIC_HEARTBEAT", 15.0, least=0.2, most=3600.0)


_clients: dict[str, Any] = {}


def redis_client() -> Any:
    """A redis-py client for the configured URL (one per process and URL), or None (no URL, no package)."""
    from . import config

    url = config.redis_url()
    if not url:
        return None
    client = _clients.get(url)
    if client is None:
        try:
            import redis

            client = _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2,
                                                          decode_responses=True)
        except Exception:
            return None
    return client


def _name(owner: str, row_id: int) -> str:
    return f"{owner}:{row_id}"


_open: dict[str, tuple[hooks.Block, dict[str, str]]] = {}  # name -> (armed, record) of this process
_lock = threading.Lock()
_thread: threading.Thread | None = None
_wake = threading.Event()


def on_arm(armed: hooks.Block, spec: dict[str, Any]) -> None:
    """An armed block: record it in Redis and keep its heartbeat going (if Redis is configured)."""
    from . import config
    from .outbox import owner_id

    if not config.redis_url():
        return
    host = str(spec.get("host") or "")
    record = {"host": host, "label": armed.title, "to": spec.get("to") or "", "thread_key": spec.get("thread_key") or "",
              "started": str(armed.started), "text": f"💀 {armed.title} on {host}", "progress": "", "beat": str(time.time())}
    name = _name(owner_id(), armed.id)
    armed.extra["lost"] = name
    with _lock:
        _open[name] = (armed, record)
        thread = _new_thread()
    if thread is not None:
        thread.start()
    _wake.set()  # the first beat now, from the heartbeat thread: the block never waits for Redis


def on_close(armed: hooks.Block) -> None:
    name = armed.extra.get("lost")
    if not name:
        return
    with _lock:
        _open.pop(name, None)
    _forget(name)


def on_fired(spec: dict[str, Any], row: dict[str, Any]) -> None:
    """A death or termination notice was posted on the host: the watch has nothing to add.

    In the process that owns the block (a termination card, a block still
    open at exit) the block never closes (no :func:`on_close`): it stops
    beating here, or the next beat would write its record again and the
    watch, once the process is gone, would say it lost contact with a job
    already reported ended.
    """
    from . import config

    if not (config.redis_url() and row.get("owner")):
        return
    name = _name(str(row["owner"]), int(row["id"]))
    with _lock:
        held = _open.get(name)
        if held is not None and _same_block(held[0], spec):
            del _open[name]
    _forget(name)


def _same_block(armed: hooks.Block, spec: dict[str, Any]) -> bool:
    """Whether the open ``armed`` is the block an armed row's ``spec`` was written for (not another outbox's row of that id)."""
    try:
        return float(spec.get("started") or 0.0) == float(armed.started) and str(spec.get("title") or "") == armed.title
    except (TypeError, ValueError):
        return False


def _forget(name: str) -> None:
    client = redis_client()
    if client is None:
        return
    try:
        client.delete(PREFIX + "open:" + name, PREFIX + "beat:" + name)
    except Exception:
        pass


def _beat_once(names: list[str] | None = None) -> None:
    client = redis_client()
    if client is None:
        return
    every = beat_every()
    with _lock:
        items = [(n, _open[n]) for n in (names or list(_open)) if n in _open]
    try:
        pipe = client.pipeline(transaction=False)
        now = str(time.time())
        for name, (armed, record) in items:
            record.update(beat=now, progress=armed.last_progress[:300])
            pipe.hset(PREFIX + "open:" + name, mapping=record)
            pipe.expire(PREFIX + "open:" + name, KEEP)
            pipe.set(PREFIX + "beat:" + name, now, ex=max(1, round(3 * every)))
        pipe.execute()
    except Exception:
        pass  # Redis away: the next beat tries again (the watch says "lost" only after --lost-after)
    with _lock:
        gone = [name for name, _ in items if name not in _open]
    for name in gone:  # closed or fired while this beat was on its way: what it wrote goes too
        _forget(name)


def _new_thread() -> threading.Thread | None:
    """A heartbeat thread to start (the caller holds ``_lock``), or None: one runs and will see the new block.

    Decided under the lock the thread takes to decide to end (:func:`_run`):
    a thread that has decided to end has already said so, so a block opened
    just then starts a new one instead of being left without a heartbeat.
    """
    global _thread
    if _thread is not None and _thread.is_alive():  # a forked child: its parent's thread is not alive here
        return None
    _thread = threading.Thread(target=_run, name="chat_magic-heartbeat", daemon=True)
    return _thread


def _run() -> None:
    global _thread
    while True:
        _wake.wait(beat_every())
        _wake.clear()
        with _lock:
            if not _open:
                if _thread is threading.current_thread():
                    _thread = None  # the next block starts a new thread
                return
        _beat_once()


def _after_fork_in_child() -> None:
    """A forked child beats for none of its parent's blocks (they die with the parent), with fresh locks."""
    global _lock, _thread, _wake
    _lock = threading.Lock()  # the parent's heartbeat thread may have held it at the fork
    _wake = threading.Event()
    _thread = None
    _open.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

hooks.on_arm.append(on_arm)
hooks.on_close.append(on_close)
hooks.on_fired.append(on_fired)


