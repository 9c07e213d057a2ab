"""Lost hosts: a machine that vanishes whole is reported from another one, through Redis.

A process cannot report its own host's disappearance (a preempted VM, a
Colab runtime disconnected, a node that lost power): its watcher goes with
it. With ``CHAT_MAGIC_REDIS_URL`` (or ``redis_url`` in the config), every
open block keeps a record and a heartbeat in Redis (their keys and fields:
:mod:`chat_magic.heartbeat`), deleted when it closes or its notice is posted.
``chat-magic watch [--lost-after 120]``, a long-running
command for any machine that reaches Redis (a login node, a small pod), posts

    📡 lost contact with *gpu-node-17* running *label* 4 min ago

into the job's thread when a heartbeat has expired and the last beat is
older than ``--lost-after`` seconds without the block closing, and

    📡 back in contact with *gpu-node-17* running *label*

if it beats again. The watch resolves each webhook from its own environment
or config file (the named spaces), so no secret ever goes through Redis.
"""

from __future__ import annotations

import time
from typing import Any

from .heartbeat import KEEP, PREFIX, redis_client

__all__ = ["check", "main"]


# -- chat-magic watch --------------------------------------------------------------


def _post(record: dict[str, str], text: str) -> None:
    from . import config
    from .delivery import send

    webhook = config.resolve(record.get("to") or None)
    send(text, to=webhook, thread_key=record.get("thread_key") or None, keep_on_fault=True).wait(60)


def check(client: Any, lost_after: float, now: float | None = None) -> list[str]:
    """One pass over the open blocks in Redis: post what was lost or came back; return what was posted."""
    from .message import neutralize
    from .report import format_duration

    now = time.time() if now is None else now
    posted = []
    for key in client.scan_iter(match=PREFIX + "open:*", count=500):
        name = key[len(PREFIX + "open:"):]
        record = client.hgetall(key)
        if not record:
            continue
        alive = client.exists(PREFIX + "beat:" + name)
        host, label = neutralize(record.get("host", "?")), neutralize(record.get("label", "a job"))
        if alive and record.get("lost"):
            if not client.hdel(key, "lost"):
                continue  # another watch said it
            text = f"📡 back in contact with *{host}* running *{label}*"
            _post(record, text)
            posted.append(text)
        elif not alive and not record.get("lost"):
            since = now - float(record.get("beat") or now)
            if since < lost_after:
                continue
            if not client.hsetnx(key, "lost", str(now)):
                continue  # another watch (or a pass before) said it: once
            client.expire(key, KEEP)
            last = f" (last: {neutralize(record['progress'])})" if record.get("progress") else ""
            text = f"📡 lost contact with *{host}* running *{label}* {format_duration(since)} ago{last}"
            _post(record, text)
            posted.append(text)
    return posted


def main(argv: list[str] | None = None) -> int:
    """``chat-magic watch``: report hosts that stop beating (runs until interrupted)."""
    import argparse

    from .console import say
    from .errors import ChatMagicError
    from .pacing import redact_url
    from .rules import seconds_arg

    p = argparse.ArgumentParser(prog="chat-magic watch",
                                description="Post into a job's thread when its host stops sending heartbeats to Redis.")
    p.add_argument("--lost-after", type=seconds_arg(above=True), default=120.0, metavar="S",
                   help="seconds without a heartbeat before a host counts as lost (default 120)")
    p.add_argument("--every", type=seconds_arg(above=True, most=3600.0), default=5.0, metavar="S", help="seconds between two looks (default 5)")
    p.add_argument("--once", action="store_true", help="look once and exit (cron)")
    args = p.parse_args(argv)
    if not args.lost_after > 0 or not args.every > 0:
        say("--lost-after and --every take seconds > 0", prefix="chat-magic watch")
        return 2
    from . import config

    url = config.redis_url()
    if not url:
        say("no Redis configured: set CHAT_MAGIC_REDIS_URL (redis://host:6379/0) or redis_url in the config file",
            prefix="chat-magic watch")
        return 2
    client = redis_client()
    if client is None:
        say('the redis package is missing: pip install "chat-magic[redis]"', prefix="chat-magic watch")
        return 2
    say(f"watching {redact_url(url)} (lost after {args.lost_after:g} s)", prefix="chat-magic watch")
    while True:
        try:
            for line in check(client, args.lost_after):
                say(line, prefix="chat-magic watch")
        except ChatMagicError as e:
            say(str(e), prefix="chat-magic watch")
        except Exception as e:  # Redis away: say so, try again
            say(f"{type(e).__name__}: {redact_url(str(e))}", prefix="chat-magic watch")
        if args.once:
            return 0
        try:
            time.sleep(args.every)
        except KeyboardInterrupt:
            return 0
