"""The ``chat-magic`` command.

    chat-magic send TEXT|- [--to NAME] [--thread KEY] [--timeout S]
    chat-magic run [--to NAME] [--label L] [--notify-start] -- CMD ARGS...
    chat-magic outbox [list|flush|retry ID...|drop ID...|path] [--all-hosts]
    chat-magic emulator [--port N] [--key K --token T]
    chat-magic demo
    chat-magic spaces add NAME [--test] | list | remove NAME
    chat-magic watch [--lost-after 120]

A user's mistake is one line on stderr and exit status 2; a message that was
not delivered is one line and exit status 1. No output ever shows a
webhook's key or token.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from .console import say
from .errors import ChatMagicError, ConfigError, DeliveryError, DeliveryTimeout, MessageError
from .rules import seconds_arg
from .webhook import redact

if TYPE_CHECKING:
    from .hosts import HostFile
    from .outbox import Outbox

__all__ = ["cmd_outbox", "cmd_outbox_all_hosts", "cmd_send", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

OUTBOX_ACTIONS = {
    "list": "show waiting and failed messages with their reasons (--all: delivered ones too)",
    "flush": "deliver everything waiting now, and wait for it (--timeout)",
    "retry": "queue failed messages again (ID ..., or --all) and deliver them",
    "drop": "delete messages that wait or failed (ID ...): they will never be sent",
    "prune": "forget delivered messages older than 7 days",
    "path": "print this host's outbox file (one file per host: a shared home directory is safe)",
}


def _err(msg: str) -> None:
    say(msg, prefix="chat-magic")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chat-magic", description="Post to a Google Chat space through its webhook.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "send", help="send a message and wait until it is delivered",
        description="Send a message to a Google Chat space and wait until the space has it. Exit status: 0 "
                    "delivered; 1 refused or not delivered within --timeout (it stays queued); 2 a mistake in the call.",
        epilog="Examples: chat-magic send 'deploy *done*' --to ml-team;  make 2>&1 | tail -20 | chat-magic send -",
    )
    s.add_argument("text", help="the message (Chat syntax: *bold*, _italic_, `code`), or - to read it from stdin")
    s.add_argument("--to", metavar="NAME", help="a space named in the config file (default: GOOGLE_CHAT_WEBHOOK_URL)")
    s.add_argument("--thread", metavar="KEY", help="thread key to post into (default: a new thread)")
    s.add_argument("--truncate", action="store_true", help="cut a long message with a note instead of splitting it")
    s.add_argument("--timeout", type=seconds_arg(), default=30.0, metavar="S",
                   help="the longest this command waits, in all, for delivery (default 30)")

    sub.add_parser("run", help="run a command and post a notice when it ends", add_help=False)

    actions = "\n".join(f"  {name:<7} {what}" for name, what in OUTBOX_ACTIONS.items())
    o = sub.add_parser(
        "outbox", help="inspect and manage messages waiting in the outbox",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Every message is written to a local outbox before it is sent, and stays there until the "
                    "space has it.\n\nactions:\n" + actions,
    )
    o.add_argument("action", nargs="?", default="list", choices=list(OUTBOX_ACTIONS), help="what to do (default: list)")
    o.add_argument("ids", nargs="*", type=int, metavar="ID", help="message ids, as `list` shows them (retry, drop)")
    o.add_argument("--all", action="store_true", help="list: show delivered messages too; retry: every failed one")
    o.add_argument("--timeout", type=seconds_arg(), default=60.0, metavar="S", help="flush, retry: how long to wait (default 60)")
    o.add_argument("--all-hosts", action="store_true",
                   help="list, flush: every host's outbox file in the folder (flush only hosts whose jobs are over)")

    sub.add_parser("emulator", help="serve a local Google Chat webhook emulator", add_help=False)
    sub.add_parser("demo", help="run the quickstart notebook against the emulator and show the thread", add_help=False)
    sub.add_parser("spaces", help="add (hidden prompt), list or remove named spaces", add_help=False)
    sub.add_parser("watch", help="post when a job's host stops sending heartbeats to Redis (runs until stopped)",
                   add_help=False)
    return p


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: TextIO | None = None, line: str | None = None) -> None:
    if file is None or file is sys.stderr:
        say(f"warning: {message}", prefix="chat-magic")
    else:
        print(f"chat-magic: warning: {redact(message)}", file=file)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import warnings

    warnings.showwarning = _one_line_warning  # a command-line user gets one line, not Python's two
    # subcommands with their own parsers get the rest of the line untouched
    if argv and argv[0] in ("run", "emulator", "demo", "spaces", "watch"):
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

        return int(run_main(rest) or 0)
    if command == "emulator":
        from .emulator.server import main as emulator_main

        return int(emulator_main(rest, prog="chat-magic emulator") or 0)
    if command == "watch":
        from .lost import main as watch_main

        return int(watch_main(rest) or 0)
    if command == "spaces":
        from .spaces import main as spaces_main

        return int(spaces_main(rest) or 0)
    from .demo import main as demo_main

    return int(demo_main(rest) or 0)


def cmd_send(args: argparse.Namespace) -> int:
    from . import delivery, rules

    deadline = time.monotonic() + max(0.0, args.timeout)  # --timeout is the whole wait, reading stdin aside
    text = sys.stdin.read() if args.text == "-" else args.text
    thread = rules.validate_thread_key(args.thread, option="--thread")  # send() checks it too; this names the option
    receipt = delivery.send(text, to=args.to, thread_key=thread, truncate=args.truncate)  # a temporary outbox says so itself
    try:
        result = receipt.wait(max(0.0, deadline - time.monotonic()))
    except DeliveryTimeout:
        receipt.mark_reported()  # said here: no second line, and no second wait, at exit
        delivery.settings.exit_timeout = 0.0
        last = f"; last error: {receipt.error}" if receipt.error else ""
        _err(f"not delivered within {args.timeout:g} s (still queued, will retry){last}")
        return EXIT_FAILED
    except DeliveryError as e:
        _err(f"not delivered: {e}")
        return EXIT_FAILED
    parts = len(receipt.ids)
    more = f" ({parts} parts)" if parts > 1 else ""
    print(f"delivered{more}: {result.name} in {result.thread_name}")
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    from . import delivery
    from .outbox import FAILED, PENDING, SENDING, SENT

    if args.action == "path":
        from . import config, hosts

        print(hosts.outbox_path(config.home()))
        return EXIT_OK
    if args.all_hosts:
        return cmd_outbox_all_hosts(args)
    d = delivery.dispatcher()
    box = d.outbox  # a temporary outbox standing in has said so on stderr
    if args.action == "list":
        states = None if args.all else [PENDING, SENDING, FAILED]
        rows = box.rows(states=states)
        counts = box.counts()
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"
        print(f"outbox {box.path}: {summary}")
        _say_unknown_states(counts)
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
            line = f"{r.id:>6}  {r.state:<8} {when}  {r.space_key.split('/', 1)[-1]}  tries={r.attempts}"
            if r.state == FAILED or (r.error and r.state != SENT):
                line += f"  {_shown(r.error)}"
            print(redact(line))
        return EXIT_OK
    if args.action == "flush":
        ok = d.flush(args.timeout)
        counts = box.counts()
        left = counts.get(PENDING, 0) + counts.get(SENDING, 0)
        failed = counts.get(FAILED, 0)
        print(f"{left} waiting, {failed} failed, {counts.get(SENT, 0)} delivered")
        return EXIT_OK if ok and not left else EXIT_FAILED
    if args.action == "retry":
        ids = args.ids or ([r.id for r in box.rows(states=[FAILED])] if args.all else [])
        if not ids and not args.all:
            _err("name the messages to retry (chat-magic outbox retry ID ...) or use --all")
            return EXIT_USAGE
        unknown = _unknown_ids(box, ids)
        n = box.requeue(ids)
        print(f"{n} message(s) queued again")
        if unknown:
            _err(unknown)
            return EXIT_USAGE
        if not n:
            return EXIT_OK
        d.ensure_running()
        ok = d.flush(args.timeout)
        return EXIT_OK if ok else EXIT_FAILED
    if args.action == "drop":
        if not args.ids:
            _err("name the messages to drop: chat-magic outbox drop ID ...")
            return EXIT_USAGE
        unknown = _unknown_ids(box, args.ids)
        print(f"{box.drop(args.ids)} message(s) dropped")
        if unknown:
            _err(unknown)
            return EXIT_USAGE
        flying = [str(r.id) for r in box.rows(args.ids)]  # still there: a request carries it right now
        if flying:
            _err(f"message {', '.join(flying)} is being sent right now and cannot be stopped (see: chat-magic outbox list)")
            return EXIT_FAILED
        return EXIT_OK
    if args.action == "prune":
        print(f"{box.prune(7 * 86400)} delivered message(s) older than 7 days forgotten")
        return EXIT_OK
    return EXIT_USAGE


def _shown(error: str | None) -> str:
    """A row's error as ``outbox list`` prints it: scrubbed again (a row an older version stored may hold an echo)."""
    from .webhook import scrub_error

    return scrub_error(error) if error else ""


def _say_unknown_states(counts: dict[str, int], where: str = "") -> None:
    """One line when the outbox holds rows in states this version does not know (a newer chat_magic wrote them)."""
    from . import outbox

    known = {outbox.PENDING, outbox.SENDING, outbox.SENT, outbox.FAILED, outbox.MERGED}
    known.update(getattr(outbox, "STATES", ()))  # a newer outbox module may name more
    unknown = {s: n for s, n in counts.items() if s not in known}
    if unknown:
        states = ", ".join(f"{n} {s!r}" for s, n in sorted(unknown.items()))
        _err(f"{where}{sum(unknown.values())} message(s) in a state this version does not know ({states}): a newer "
             "chat_magic wrote them and this version leaves them alone: upgrade chat_magic to deliver or list them")


def _unknown_ids(box: Outbox, ids: list[int]) -> str:
    """One line naming the ids the outbox does not hold, or ``""``."""
    known = {r.id for r in box.rows(ids)}
    missing = [str(i) for i in dict.fromkeys(ids) if i not in known]
    if not missing:
        return ""
    return f"no message {', '.join(missing)} in the outbox {box.path} (see: chat-magic outbox list --all)"


def cmd_outbox_all_hosts(args: argparse.Namespace) -> int:
    """``outbox list|flush --all-hosts``: every host's file in the (shared) folder.

    ``flush`` delivers from other hosts' files only when they look unused (no
    lease, no write for two minutes): two hosts must not open one SQLite file.
    """
    from . import config, hosts

    if args.action not in ("list", "flush"):
        _err("--all-hosts goes with list or flush")
        return EXIT_USAGE
    home = config.home()
    files = hosts.outbox_files(home)
    if not files:
        print(f"no outbox files in {home}")
        return EXIT_OK
    status = EXIT_OK
    for f in files:
        if args.action == "list":
            _list_host_file(f)
        elif not _flush_host_file(f, args.timeout):
            status = EXIT_FAILED
    return status


def _list_host_file(f: HostFile) -> None:
    """One host's file: this host's through its outbox, another's read only (never taken over, locked or changed)."""
    import sqlite3

    from .outbox import FAILED, PENDING, SENDING, Outbox, peek

    shown = [PENDING, SENDING, FAILED]
    if f.mine:
        box = Outbox(f.path)
        try:
            if box.problem:
                _err(f"{f.label}: {box.problem}")
                return
            counts, rows = box.counts(), box.rows(states=shown)
        finally:
            box.close()
    else:
        try:
            counts, rows = peek(f.path, shown)
        except sqlite3.Error as e:
            _err(f"{f.label}: {f.path} could not be read ({_unreadable(e)}); it was left as it is")
            return
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"
    print(f"{f.label}{' (this host)' if f.mine else ''}: {f.path}: {summary}")
    _say_unknown_states(counts, f"{f.label}: ")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
        line = f"{r.id:>6}  {r.state:<8} {when}  {r.space_key.split('/', 1)[-1]}  tries={r.attempts}"
        if r.error:
            line += f"  {_shown(r.error)}"
        print(redact(line))


def _unreadable(e: BaseException) -> str:
    """Why another host's file could not be read, in words (its owner's chat_magic repairs a damaged one)."""
    text = str(e) or type(e).__name__
    name = getattr(e, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return f"{text}: another process holds its lock; try again in a moment"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return f"{text}: damaged; the next chat_magic process on that host repairs it"
    return text


def _flush_host_file(f: HostFile, timeout: float) -> bool:
    """Deliver what waits in one host's file; False when some of it is still there."""
    from . import delivery
    from .outbox import FAILED, PENDING, SENDING, SENT, in_use, unfinished

    running = delivery.dispatcher() if f.mine else delivery.running_dispatcher(f.path)  # the old single file: drained already
    mine = running is not None
    if running is not None:
        d = running
    else:
        if not unfinished(f.path):
            print(f"{f.label}: nothing waiting")
            return True
        busy = in_use(f.path)
        if busy:
            _err(f"{f.label}: left alone, its outbox looks in use: {busy}; run this again once that host's jobs are over")
            return False
        d = delivery.open_dispatcher(f.path)
    try:
        ok = d.flush(timeout)
        counts = d.outbox.counts()
    finally:
        if not mine:
            d.stop(2.0)
            d.outbox.close()
    left = counts.get(PENDING, 0) + counts.get(SENDING, 0)
    print(f"{f.label}: {left} waiting, {counts.get(FAILED, 0)} failed, {counts.get(SENT, 0)} delivered")
    return ok and not left


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
