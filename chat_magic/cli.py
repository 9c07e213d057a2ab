"""The ``chat-magic`` command.

    chat-magic send TEXT|- [--to NAME] [--thread KEY] [--timeout S]
    chat-magic run [--to NAME] [--label L] [--notify-start] -- CMD ARGS...
    chat-magic outbox [list|flush|retry ID...|drop ID...]
    chat-magic emulator [--port N] [--key K --token T]
    chat-magic demo

A user's mistake is one line on stderr and exit status 2; a message that was
not delivered is one line and exit status 1. No output ever shows a
webhook's key or token.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from .errors import ChatMagicError, ConfigError, DeliveryError, MessageError
from .webhook import redact

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(f"chat-magic: {redact(msg)}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chat-magic", description="Post to a Google Chat space through its webhook.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("send", help="send a message and wait until it is delivered")
    s.add_argument("text", help="the message (Chat syntax), or - to read it from stdin")
    s.add_argument("--to", metavar="NAME", help="a space named in the config file (default: GOOGLE_CHAT_WEBHOOK_URL)")
    s.add_argument("--thread", metavar="KEY", help="thread key to post into (default: a new thread)")
    s.add_argument("--truncate", action="store_true", help="cut a long message with a note instead of splitting it")
    s.add_argument("--timeout", type=float, default=30.0, metavar="S", help="how long to wait for delivery (default 30)")

    sub.add_parser("run", help="run a command and post a notice when it ends", add_help=False)

    o = sub.add_parser("outbox", help="inspect and manage messages waiting in the outbox")
    o.add_argument("action", nargs="?", default="list", choices=["list", "flush", "retry", "drop", "prune"])
    o.add_argument("ids", nargs="*", type=int, metavar="ID")
    o.add_argument("--all", action="store_true", help="list: show delivered messages too; retry: every failed one")
    o.add_argument("--timeout", type=float, default=60.0, metavar="S", help="flush: how long to wait (default 60)")

    sub.add_parser("emulator", help="serve a local Google Chat webhook emulator", add_help=False)
    sub.add_parser("demo", help="run the quickstart notebook against the emulator and show the thread", add_help=False)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"chat-magic: warning: {redact(message)}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import warnings

    warnings.showwarning = _one_line_warning  # a command-line user gets one line, not Python's two
    # subcommands with their own parsers get the rest of the line untouched
    if argv and argv[0] in ("run", "emulator", "demo"):
        return _delegate(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "send":
            return cmd_send(args)
        if args.command == "outbox":
            return cmd_outbox(args)
    except (ConfigError, MessageError) as e:
        _err(str(e))
        return EXIT_USAGE
    except ChatMagicError as e:
        _err(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("interrupted; queued messages stay in the outbox")
        return 130
    _parser().print_help()
    return EXIT_USAGE


def _delegate(command: str, rest: list[str]) -> int:
    if command == "run":
        from .run import main as run_main
    elif command == "emulator":
        from .emulator.__main__ import main as run_main  # type: ignore[no-redef]
    else:
        from .demo import main as run_main  # type: ignore[no-redef]
    return int(run_main(rest) or 0)


def cmd_send(args: argparse.Namespace) -> int:
    from . import delivery

    text = sys.stdin.read() if args.text == "-" else args.text
    receipt = delivery.send(text, to=args.to, thread_key=args.thread, truncate=args.truncate)  # a temporary outbox says so itself
    try:
        result = receipt.wait(args.timeout)
    except DeliveryError as e:
        _err(f"not delivered: {e}")
        return EXIT_FAILED
    parts = len(receipt.ids)
    more = f" ({parts} parts)" if parts > 1 else ""
    print(f"delivered{more}: {result.name} in {result.thread_name}")
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    from . import delivery
    from .outbox import FAILED, PENDING, SENDING

    d = delivery.dispatcher()
    box = d.outbox  # a temporary outbox standing in has said so on stderr
    if args.action == "list":
        states = None if args.all else [PENDING, SENDING, FAILED]
        rows = box.rows(states=states)
        counts = box.counts()
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"
        print(f"outbox {box.path}: {summary}")
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
            line = f"{r.id:>6}  {r.state:<8} {when}  {r.space_key.split('/', 1)[-1]}  tries={r.attempts}"
            if r.state == FAILED or (r.error and r.state != "sent"):
                line += f"  {r.error}"
            print(redact(line))
        return EXIT_OK
    if args.action == "flush":
        ok = d.flush(args.timeout)
        counts = box.counts()
        left = counts.get(PENDING, 0) + counts.get(SENDING, 0)
        failed = counts.get(FAILED, 0)
        print(f"{left} waiting, {failed} failed, {counts.get('sent', 0)} delivered")
        return EXIT_OK if ok and not left else EXIT_FAILED
    if args.action == "retry":
        ids = args.ids or ([r.id for r in box.rows(states=[FAILED])] if args.all else [])
        if not ids:
            _err("name the messages to retry (chat-magic outbox retry ID ...) or use --all")
            return EXIT_USAGE
        n = box.requeue(ids)
        print(f"{n} message(s) queued again")
        d.ensure_running()
        ok = d.flush(args.timeout)
        return EXIT_OK if ok else EXIT_FAILED
    if args.action == "drop":
        if not args.ids:
            _err("name the messages to drop: chat-magic outbox drop ID ...")
            return EXIT_USAGE
        print(f"{box.drop(args.ids)} message(s) dropped")
        return EXIT_OK
    if args.action == "prune":
        print(f"{box.prune(7 * 86400)} delivered message(s) older than 7 days forgotten")
        return EXIT_OK
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
