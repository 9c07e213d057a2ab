"""``chat-magic run``: run a command and post a notice when it ends.

    chat-magic run [--to NAME] [--label L] [--notify-start] [--thread KEY]
                   [--on always|error] [--mention all|ID|EMAIL] [--wait S] -- CMD ARGS...

- The command's stdout and stderr pass through unchanged, byte for byte, as
  they come (read from pipes by two threads, written to our own stdout and
  stderr and flushed); the last 64 KiB are kept for the notice. Python
  children get ``PYTHONUNBUFFERED=1`` (unless set) so their output streams.
- The notice says the label (default: the command line, shortened), the exit
  code or the signal ("killed by SIGTERM"), the duration, host and the last
  lines of output.
- ``chat-magic run`` exits with the command's exit code, or 128 + the signal
  number when a signal killed it (as shells do); 127 when the command is not
  found, 126 when it cannot be executed (a failure notice is still posted:
  an unattended job with a typo should not go silent); 2 for a usage or
  set-up mistake (checked before the command starts).
- SIGTERM, SIGHUP and SIGINT sent to ``chat-magic run`` are forwarded to the
  command, and it waits for the command to end. A Ctrl-C typed in a terminal
  already reaches the command (same process group), so that one is not sent
  twice; a second Ctrl-C is always forwarded.
- Before exiting it waits (``--wait``, default 10 s) for the notice to be
  delivered; if it was not, it says so in one line: the notice stays in the
  outbox and the next chat_magic process (or ``chat-magic outbox flush``)
  delivers it.
- In a SLURM/MPI/torchrun job only rank 0 posts a success; a failure is
  posted by whichever rank fails (``CHAT_MAGIC_RANKS=all``: every rank).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, BinaryIO, NoReturn

from . import ranks as _ranks
from .console import say
from .errors import ChatMagicError
from .report import signal_name
from .rules import MENTION_HELP, seconds_arg

__all__ = ["build_parser", "main"]

TAIL_BYTES = 64 * 1024
PROG = "chat-magic run"
QUEUED = "notice queued; it will be delivered by the next chat_magic process or `chat-magic outbox flush`"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump, no SystemExit
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run a command, pass its output through, and post a notice to Google Chat when it ends.",
        epilog="Example: chat-magic run --label training -- python train.py --epochs 10",
    )
    p.add_argument("--to", metavar="NAME", help="space name from the config file (default: GOOGLE_CHAT_WEBHOOK_URL)")
    p.add_argument("--label", metavar="L", help="what to call the job in the notice (default: the command line)")
    p.add_argument("--notify-start", action="store_true", help="also post when the command starts")
    p.add_argument("--thread", metavar="KEY", help="post into the thread with this key (default: a new thread per run)")
    p.add_argument("--on", choices=("always", "error"), default="always",
                   help="post on every ending (default) or only on failure (a child killed by SIGINT is not one)")
    p.add_argument("--mention", metavar="WHO", help=f"who to mention in the notice: {MENTION_HELP}")
    p.add_argument("--no-cards", dest="cards", action="store_false", help="post plain text instead of a card")
    p.add_argument("--wait", metavar="S", type=seconds_arg(), default=10.0, help="seconds to wait for delivery before exiting (default 10)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments, after --")
    return p


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


class Tail:
    """The last ``limit`` bytes written by both streams, in arrival order."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._lock = threading.Lock()

    def add(self, chunk: bytes) -> None:
        with self._lock:
            self._buf += chunk
            if len(self._buf) > 2 * self.limit:
                del self._buf[: len(self._buf) - self.limit]

    def text(self) -> str:
        with self._lock:
            data = bytes(self._buf[-self.limit:])
        return data.decode("utf-8", errors="replace")


def _binary(stream: Any) -> BinaryIO | None:
    return getattr(stream, "buffer", None)


def _pump(src: BinaryIO, dst_name: str, tail: Tail) -> None:
    """Copy ``src`` to our stdout/stderr as it comes, keeping a tail. Goes on draining if the output breaks."""
    fd = src.fileno()
    broken = False
    while True:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
        tail.add(chunk)
        if broken:
            continue
        out = getattr(sys, dst_name)
        try:
            raw = _binary(out)
            if raw is not None:
                out.flush()  # text written earlier goes first
                raw.write(chunk)
                raw.flush()
            else:
                out.write(chunk.decode("utf-8", errors="replace"))
                out.flush()
        except (BrokenPipeError, ValueError, OSError):
            broken = True  # e.g. `chat-magic run -- cmd | head`: keep the child from blocking
    try:
        src.close()
    except OSError:
        pass


def _say(message: str) -> None:
    say(message, prefix=PROG)


class _Forwarder:
    """Forward SIGTERM/SIGHUP/SIGINT to the child while it runs (main thread only)."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.received: list[int] = []
        self.forwarded: list[int] = []
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except (ValueError, OSError):
                pass

    def restore(self) -> None:
        for s, h in self._old.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError):
                pass
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        self.forward(signum)

    def forward(self, signum: int, pending: bool = False) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if not pending and signum == signal.SIGINT and self.received.count(signum) == 1 and _terminal_foreground():
            return  # the terminal sent this Ctrl-C to the child too
        try:
            os.kill(proc.pid, signum)
            self.forwarded.append(signum)
        except OSError:
            pass


def _signals_received(fwd: _Forwarder) -> str:
    parts = []
    for s in dict.fromkeys(fwd.received):
        how = "forwarded" if s in fwd.forwarded else "from the terminal, not forwarded"
        parts.append(f"{signal_name(s)} ({how})")
    return "received " + ", ".join(parts)


def _terminal_foreground() -> bool:
    """Whether we (and so the child) are the terminal's foreground process group."""
    for stream in (sys.stdin, sys.stderr, sys.stdout):
        try:
            fd = stream.fileno()
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except (AttributeError, OSError, ValueError):
            continue
    return False


class _Ended:
    """How the command ended: its exit status, the tail of its output, the signals that came."""

    def __init__(self, returncode: int, duration: float, tail: Tail, fwd: _Forwarder, start_error: str = "") -> None:
        self.returncode = returncode  # negative: killed by that signal
        self.duration = duration
        self.tail = tail
        self.fwd = fwd
        self.start_error = start_error

    @property
    def exit_code(self) -> int:
        """Ours: the command's, or 128 + the signal number as shells report it."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    def reason(self) -> str:
        """The error line when the plain exit status is not the whole story."""
        if self.start_error:
            return f"{self.start_error} (exit code {self.returncode})"
        if self.returncode < 0 and self.fwd.forwarded:
            signals = ", ".join(signal_name(s) for s in dict.fromkeys(self.fwd.forwarded))
            return f"killed by {signal_name(-self.returncode)} (forwarded by {PROG}, which received {signals})"
        return ""


class _Job:
    """The checked request: where to post, under what name, from which rank. Built before the command runs."""

    def __init__(self, args: argparse.Namespace, command: list[str]) -> None:
        from . import config, rules
        from .session import Session

        self.args = args
        self.command = command
        self.webhook = config.resolve(args.to)
        self.rank = _ranks.current()
        _ranks.policy(None)
        self.mention = rules.validate_mention(args.mention, option="--mention")
        thread = rules.validate_thread_key(args.thread, option="--thread")
        # scrubbed whole, before any shortening: no piece of a secret in a label
        short = self.webhook.scrub(shlex.join([os.path.basename(command[0]) or command[0], *command[1:]]))
        label = self.webhook.scrub(args.label) if args.label else shorten(short)
        self.title = f"{label} ({self.rank.describe()})" if self.rank.distributed else label
        self.session = Session(thread_key=thread)
        self.session.kind, self.session.source = "command", shorten(short, 80)
        self.session.announce = False  # each notice says which command and host: no header message before it
        if not thread and not os.environ.get("CHAT_MAGIC_THREAD_KEY"):
            self.session.new_thread()  # a key made from the command, not from "chat-magic"
        self.details = {"Command": shorten(self.webhook.scrub(shlex.join(command)), 500), "Host": self.session.host}
        if self.rank.distributed:
            self.details["Rank"] = self.rank.describe()
        self.receipts: list[Any] = []
        self.armed: Any = None  # the death notice while the command runs (deadman.py)

    def post(self, report: Any) -> None:
        """Queue ``report`` if this rank posts its kind; a problem is one line, never an exception."""
        try:
            if _ranks.should_post(report.kind, None, self.rank):
                armed = self.armed if report.kind != _ranks.START else None
                self.receipts.append(self.session.send(to=self.webhook, keep_on_fault=True,
                                                       disarm=armed.replacing() if armed is not None else None,
                                                       **report.payload_kwargs(cards=self.args.cards)))
                if armed is not None:
                    armed.replaced = True  # the notice's transaction disarmed it
                if report.kind != _ranks.START:
                    from .deadman import mark_important

                    mark_important(self.receipts[-1])
        except Exception as e:
            _say(f"notice not posted: {e if isinstance(e, ChatMagicError) else f'{type(e).__name__}: {e}'}")

    def arm(self) -> Any:
        """The death notice, in the outbox before the command starts: reported if chat-magic run itself is killed."""
        from . import arming

        self.armed = arming.arm(self.webhook, self.session.thread_key, title=self.title, details=dict(self.details),
                                cards=self.args.cards, to=self.args.to)
        return self.armed

    def post_start(self) -> None:
        from .report import STARTED, Report

        self.post(Report(self.title, status=STARTED, details=dict(self.details)))

    def post_end(self, ended: _Ended) -> None:
        from .report import OK, Report, should_post

        details = dict(self.details)
        if ended.fwd.received and ended.returncode >= 0:
            details["Signal"] = _signals_received(ended.fwd)
        report = Report.from_outcome(
            self.title, exit_code=ended.returncode, reason=ended.reason(), scrub=self.webhook.scrub,
            duration=ended.duration, output=self.webhook.scrub(ended.tail.text(), cut_before=True),  # the tail starts mid-stream
            details=details, mention=self.mention, max_lines=30,
        )
        if report.status == OK:
            report.details["Exit code"] = "0"
        if should_post(report.status, on_error=self.args.on == "error"):
            self.post(report)


def _execute(command: list[str]) -> _Ended:
    """Run ``command``, passing its output through and forwarding signals; return how it ended."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    tail = Tail()
    fwd = _Forwarder()
    fwd.install()
    t0 = time.monotonic()
    try:
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        except FileNotFoundError:
            return _Ended(127, time.monotonic() - t0, tail, fwd, f"command not found: {command[0]}")
        except PermissionError:
            return _Ended(126, time.monotonic() - t0, tail, fwd, f"permission denied: {command[0]}")
        except OSError as e:
            return _Ended(126, time.monotonic() - t0, tail, fwd, f"cannot run {command[0]}: {e.strerror or e}")
        fwd.proc = proc
        for s in dict.fromkeys(fwd.received):  # a signal that came while the command was starting
            fwd.forward(s, pending=True)
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, "stdout", tail), daemon=True, name="chat-magic-run-stdout"),
            threading.Thread(target=_pump, args=(proc.stderr, "stderr", tail), daemon=True, name="chat-magic-run-stderr"),
        ]
        for t in pumps:
            t.start()
        while True:
            try:
                returncode = proc.wait()
                break
            except KeyboardInterrupt:  # only if a handler could not be installed
                continue
        for t in pumps:  # a grandchild may hold the pipes open: do not wait for it forever
            t.join(timeout=2.0)
        return _Ended(returncode, time.monotonic() - t0, tail, fwd)
    finally:
        fwd.restore()


def _wait_delivery(timeout: float) -> None:
    """Wait for what this process queued; say in one line if it is not delivered."""
    try:
        from .delivery import dispatcher
        from .outbox import FAILED

        d = dispatcher()
        ids = sorted(d.mine)
        if not ids:
            return
        done = d.wait_for(ids, max(0.0, timeout))
        failed = [r for r in d.outbox.resolve(ids) if r.state == FAILED]
        if failed:
            _say(f"notice not delivered: {failed[0].error or 'refused'} (see: chat-magic outbox list)")
        elif not done:
            _say(QUEUED)
        d.reported.update(ids)  # told already: no second line at exit
    except Exception as e:
        _say(f"notice not delivered: {type(e).__name__}: {e}")


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]] | int:
    """The options and the command, or an exit status (0 after --help, 2 for a mistake, said in one line)."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        _say(f"{e} (see {PROG} --help)")
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int) else 0
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        _say(f"no command given: {PROG} [options] -- CMD ARGS...")
        return 2
    if args.wait < 0:
        _say("--wait takes a number of seconds >= 0")
        return 2
    return args, command


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``chat-magic run`` with ``argv`` (the arguments after ``run``); return the exit code."""
    parsed = _parse(list(sys.argv[1:] if argv is None else argv))
    if isinstance(parsed, int):
        return parsed
    args, command = parsed
    try:
        job = _Job(args, command)  # set-up problems now, before the command runs
    except ChatMagicError as e:
        _say(str(e))
        return 2
    if args.notify_start:
        job.post_start()
    armed = job.arm()
    ended = _execute(command)
    if ended.start_error:
        _say(ended.start_error)
    job.post_end(ended)
    if armed is not None:
        armed.disarm()  # the notice's transaction deleted it (else: now)
    if job.receipts:
        _wait_delivery(args.wait)
    return ended.exit_code


if __name__ == "__main__":  # python -m chat_magic.run -- CMD
    sys.exit(main())
