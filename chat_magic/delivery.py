"""The background worker: send what the outbox holds, paced, retried, merged.

``send`` only writes to the outbox and returns; background threads do all
network I/O. One dispatcher thread per process claims work; each space with a
request in flight has a sender thread of its own (a *lane*), so a space that
hangs or fails holds back only itself. For each request:

- the dispatcher takes the next message whose space may be posted to now and
  has nothing in flight (the outbox keeps one pacing slot per space, shared
  by every process: at most one request per ``interval`` seconds), merging
  short plain-text messages waiting behind it, and hands it to that space's lane;
- POSTs it with its ``requestId`` (the same on every retry, so a retry after a
  lost reply creates no duplicate) and, with a thread key,
  ``messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD``;
- on a network error, a timeout, 408, 429 or 5xx, schedules a retry in the
  outbox with exponential backoff and jitter (``Retry-After`` honoured);
- on any other 4xx, keeps the message as ``failed`` with a one-line reason.

Every error text is redacted: ``requests`` puts the whole URL, key and token
included, into its exception messages.

Storage faults lose nothing while the process lives: a write the worker owes
after an answer (disk full) is retried until it lands, and ``send(...,
keep_on_fault=True)`` (what the magics and ``notify_when_done`` use) keeps a
message the outbox cannot take in memory, says so in one line, and queues it,
in order, as soon as the outbox works again.

Locks, and the one order in which a thread may take them (never the reverse;
each is named again where it is made, with what it guards):

    _dlock -> Dispatcher._drain_lock -> outbox gate (outbox.py) -> Outbox._recovering
    _dlock -> config's settings lock, webhook's known lock, pacing's slots lock (leaves)
    Dispatcher._lock, Dispatcher._changed, _Wake._cond, Receipt._cb_lock: leaves, held
    for a few lines with no other lock taken inside and no outbox call made

The reentrant ones (``_dlock``, ``Dispatcher._lock``, ``_changed``, ``_Wake``,
the outbox gate, config's and webhook's) are so because a signal handler's
``send`` may run while its thread holds them; ``send`` gives back whatever an
interrupt left held (``_heal_locks``), and a fork makes them anew in the child.
"""

from __future__ import annotations

import atexit
import collections
import errno
import functools
import json
import logging
import os
import queue
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from . import config, hooks, hosts, pacing, rules
from . import outbox as _outbox
from . import webhook as webhook_module
from .console import say
from .deadman import exit_wait, fire_orphans  # imported first: it words the death notices a take-over queues
from .errors import ConfigError, DeliveryFailed, DeliveryTimeout, MessageError, OutboxError
from .message import build_payloads
from .outbox import DROPPED, FAILED, SENT, Job, Outbox
from .webhook import Webhook, redact, scrub_error, scrub_known

__all__ = [
    "ENV_EXIT_TIMEOUT", "Delivered", "Dispatcher", "Receipt", "RedactingFilter", "Settings", "backoff", "dispatcher",
    "dispatchers", "explain", "flush", "open_dispatcher", "running_dispatcher", "send", "settings", "shutdown",
]

log = logging.getLogger("chat_magic")
log.addHandler(logging.NullHandler())  # a library: no "last resort" lines on stderr from the worker thread

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_LANES = 32  # spaces with a request in flight at once, per process
# a retry waits at most this long (Retry-After and backoff_cap alike): another process reading a retry
# time further ahead takes it for a wall clock that stepped back (outbox.MAX_HOLD) and retries at once
LONGEST_RETRY = 300.0
LANE_IDLE = 30.0  # seconds a space's sender thread waits for more work before it ends


def _say(line: str) -> None:
    """One visible ``chat_magic: ...`` line on stderr: :func:`chat_magic.console.say` (redacted, never raises)."""
    say(line)


REPLY_CAP = 64 * 1024  # bytes of a reply read at most: an answer is small, a proxy's page or a flood is not read whole
ENV_EXIT_TIMEOUT = "CHAT_MAGIC_EXIT_TIMEOUT"
ENV_INTERVAL = "CHAT_MAGIC_INTERVAL"
_said: set[str] = set()  # one-line notices already given in this process (each is said once)


def _say_once(topic: str, line: str) -> None:
    """Say ``line`` on stderr the first time ``topic`` comes up in this process."""
    if topic not in _said:
        _said.add(topic)
        say(line)


class _SetOrEnv:
    """A setting read, until it is set, from an environment variable when used (never at import), at most ``at_most``.

    Its value lives in the dataclass field of its name with a leading ``_`` (None: not set).
    """

    def __init__(self, env: str, default: float, at_most: float = float("inf")) -> None:
        self.env, self.default, self.at_most = env, default, at_most

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> float:
        value = None if obj is None else getattr(obj, self.slot)
        return value if value is not None else min(self.at_most, rules.env_seconds(self.env, self.default, least=0.0, most=rules.DAY))

    def __set__(self, obj: Any, value: float) -> None:
        setattr(obj, self.slot, float(value))


@dataclass
class Settings:
    """Delivery knobs; change them with :func:`chat_magic.configure`.

    ``exit_timeout`` (how long the exit waits for this process's messages)
    comes from ``CHAT_MAGIC_EXIT_TIMEOUT`` unless set here, and ``interval``
    from ``CHAT_MAGIC_INTERVAL`` (for a server with another quota, such as
    ``chat-magic emulator --qps 0``; the test suite's processes use it); both
    are read when needed, never at import, and a bad value is one line and
    the default.
    """

    _interval: float | None = None  # None: CHAT_MAGIC_INTERVAL, else 1.1 s between two requests to one space (quota: 1/s)
    # and at least this long after the last answer: the server counts a request when it
    # arrives, somewhere between our send and its answer, so pacing from the answer is safe
    # whatever the latency or the scheduling of several processes
    _gap_after_answer: float | None = None  # None: 1.02 s, or CHAT_MAGIC_INTERVAL when that is shorter
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    backoff_base: float = 1.0
    backoff_cap: float = 15.0
    give_up_after: float = 24 * 3600.0  # a transient error older than this becomes final
    idle_poll: float = 2.0  # how often an idle worker looks for other processes' rows
    lease_seconds: float = 0.0  # a claim's lease; 0: connect + read timeout + 10 s. Renewed while the request lasts
    _exit_timeout: float | None = None  # None: CHAT_MAGIC_EXIT_TIMEOUT, else 3 s
    interval = _SetOrEnv(ENV_INTERVAL, 1.1)
    gap_after_answer = _SetOrEnv(ENV_INTERVAL, 1.1, at_most=1.02)

    @property
    def lease(self) -> float:
        return self.lease_seconds or self.connect_timeout + self.read_timeout + 10.0

    @property
    def exit_timeout(self) -> float:
        if self._exit_timeout is not None:
            return self._exit_timeout
        return rules.env_seconds(ENV_EXIT_TIMEOUT, 3.0, least=0.0, most=rules.DAY)

    @exit_timeout.setter
    def exit_timeout(self, value: float) -> None:
        self._exit_timeout = float(value)

    def exit_timeout_or(self, default: float) -> float:
        """``exit_timeout`` when set here or by a valid ``CHAT_MAGIC_EXIT_TIMEOUT``, else ``default``."""
        if self._exit_timeout is not None:
            return self._exit_timeout
        return rules.env_seconds(ENV_EXIT_TIMEOUT, default, least=0.0, most=rules.DAY)

    def names(self) -> list[str]:
        """The settings a user may change: every field (one with a leading ``_`` through its property)."""
        return sorted(f.name.lstrip("_") for f in fields(self))

    def change(self, **values: Any) -> None:
        """Set each of ``values``, all checked first: a one-line ConfigError names the setting and its form.

        Every setting is a number of seconds >= 0 (``math.inf`` allowed), so a
        string, None or a bool is a mistake, not something to coerce.
        """
        known = self.names()
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}: choose from {', '.join(known)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name}={value!r}: give a number of seconds >= 0, such as {name}={getattr(self, name):g}")
            if name in ("backoff_base", "backoff_cap") and value > LONGEST_RETRY:
                raise ConfigError(f"{name}={value!r}: a retry waits at most {LONGEST_RETRY:g} seconds; give {name}={LONGEST_RETRY:g} or less")
        for name, value in values.items():
            setattr(self, name, float(value))


settings = Settings()


class Delivered(NamedTuple):
    """What the space answered: the created message's and its thread's names."""

    name: str | None
    thread_name: str | None


def backoff(attempts: int, retry_after: float | None = None) -> float:
    """Seconds before retry number ``attempts`` (1-based): exponential, equal jitter."""
    delay = min(settings.backoff_cap, settings.backoff_base * 2 ** max(0, attempts - 1))
    delay = delay / 2 + random.uniform(0, delay / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, LONGEST_RETRY))
    return delay


def explain(code: int, status: str, message: str) -> str:
    """One line for a final refusal, saying what to do about it (``message`` scrubbed by the caller too)."""
    m = scrub_error(message or "")
    if code == 400 and ("API_KEY_INVALID" in status or "API key not valid" in m):
        return "the webhook's key is not valid: copy the webhook URL again from the space's Apps & integrations"
    if code in (401, 403):
        return "permission denied: the webhook's token is wrong, or the webhook or space was deleted"
    if code == 404:
        return "not found: the webhook or its space was deleted (or the thread does not exist)"
    if code == 413:
        return "the message is too large for Google Chat"
    detail = f": {m}" if m else ""
    return f"the space refused the message ({code} {status or 'error'}){detail}"


def _parse_error(body: bytes) -> tuple[str, str]:
    """``(status, message)`` of an error reply (at most :data:`REPLY_CAP` bytes): Google's JSON, else the text.

    The status is kept to Google's vocabulary (``PERMISSION_DENIED``,
    ``API_KEY_INVALID``): it is stored and shown apart from the message, so
    a server cannot echo anything else through it. The message is the
    caller's to scrub.
    """
    try:
        err = json.loads(body).get("error", {})
        status = str(err.get("status") or "")
        message = str(err.get("message") or "")
        for d in err.get("details") or []:
            if isinstance(d, dict) and d.get("reason"):
                status = f"{status} {d['reason']}".strip()
        return _status_words(status), message
    except Exception:
        return "", body.decode("utf-8", errors="replace")


def _status_words(status: str) -> str:
    """Only the ``UPPER_CASE`` words of a status, at most four: nothing a server echoes can ride in it."""
    import re

    return " ".join(re.findall(r"\b[A-Z][A-Z0-9_]{1,39}\b", status)[:4])


def _read_capped(resp: Any, cap: int = REPLY_CAP) -> bytes:
    """The reply's body up to ``cap`` bytes; a longer one is cut (its connection is closed, not drained)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(chunk_size=16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            break
    return b"".join(chunks)[:cap]


def _created(body: bytes) -> tuple[str, str | None] | None:
    """``(message name, thread name)`` when a 2xx body is Google's answer: JSON naming ``spaces/...``; else None."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name.startswith("spaces/"):
        return None
    thread = data.get("thread")
    thread_name = thread.get("name") if isinstance(thread, dict) else None
    return name, thread_name if isinstance(thread_name, str) else None


def _not_an_answer(code: int, body: bytes, content_type: str) -> str:
    """Why a 2xx without a message is no delivery: what came instead, in a few words."""
    head = body[:512].lstrip().lower()
    if not head:
        what = "an empty body"
    elif head.startswith((b"<!doctype", b"<html")) or "html" in content_type:
        what = "an HTML page (a proxy or a firewall answering for the server?)"
    else:
        what = "a body that names no message"
    return f"{code} with {what}, not a created message"


def _retry_after(resp: Any) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class _Lane:
    """The sender thread of one space: at most one request in flight per space.

    A space that never answers keeps its own lane busy until the read timeout;
    every other space has a lane of its own. The lane ends after
    :data:`LANE_IDLE` seconds without work; its HTTP session (kept-alive
    connection) goes with it.
    """

    def __init__(self, d: Dispatcher, space_key: str) -> None:
        self.d = d
        self.space_key = space_key
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # None: wake up (stopping)
        self.busy = False
        self.current: int | None = None  # the id being sent now
        self.session: Any = None
        self.thread = threading.Thread(target=self._run, name="chat_magic-lane", daemon=True)

    def http(self) -> Any:
        if self.session is None:
            self.session = _new_session()
        return self.session

    def _run(self) -> None:
        while True:
            stopping = self.d._stop.is_set()
            if stopping and self.d._retire(self):
                return
            try:
                job = self.jobs.get(timeout=0.05 if stopping else LANE_IDLE)
            except queue.Empty:
                if self.d._retire(self):
                    return
                continue
            if job is not None:
                self._work(job)

    def _work(self, job: Job) -> None:
        """:meth:`_one`; an interrupt even in its bookkeeping leaves the lane usable and the row to be put back."""
        try:
            self._one(job)
        except BaseException:
            _heal_locks(set())
            self.d._orphaned = True
            self.busy, self.current = False, None
            self.d._wake.set()

    def _one(self, job: Job) -> None:
        """Send one job; whatever stops it (even an asynchronous exception), the lane lives on."""
        cut = False
        self.current = job.id
        try:
            self.d._deliver(job, self)
        except Exception as e:  # never die: log (redacted) and go on
            log.warning("chat_magic: delivery error: %s", redact(f"{type(e).__name__}: {e}"))
        except BaseException as e:  # cut short: its row, still ours and leased, is put back by the dispatcher
            _heal_locks(set())
            log.warning("chat_magic: delivery interrupted: %s", type(e).__name__)
            cut = True
        finally:
            with self.d._lock:
                self.busy = False
                self.current = None
            if cut:
                self.d._orphaned = True
            self.d._finished()
            self.d._wake.set()


class _Wake(threading.Event):
    """An Event that a signal handler may set while this thread is inside ``set`` (its lock is reentrant).

    A Ctrl-C can land after ``Condition.__enter__`` took the lock and before
    the ``with`` block began: no ``__exit__`` runs, and every lane then waited
    for the lock for good (a storm of Ctrl-C jammed 1 process in ~30). ``set``
    and ``clear`` give back what an interrupt left held, and :func:`_heal_locks`
    (on the way out of ``send``) does too.
    """

    def __init__(self) -> None:
        super().__init__()
        # the Event's own condition (guards its flag), reentrant: set() may run inside set(); a leaf
        self.lock: Any = threading.RLock()  # healed like the other locks of ``send``
        self._cond = threading.Condition(self.lock)

    def set(self) -> None:
        self._given_back(super().set)

    def clear(self) -> None:
        self._given_back(super().clear)

    def _given_back(self, step: Callable[[], None]) -> None:
        outer = self.lock._is_owned()  # a signal handler's set() inside this thread's set(): the outer one gives back
        try:
            step()
        finally:
            if not outer and self.lock._is_owned():
                self.lock._release_save()  # cut between taking the lock and the with block: never kept


class _Inline:
    """The lane of :meth:`Dispatcher.deliver_now`: the calling thread itself."""

    session: Any = None

    def http(self) -> Any:
        if self.session is None:
            self.session = _new_session()
        return self.session


_T = TypeVar("_T")


def _healing(method: Callable[..., _T]) -> Callable[..., _T]:
    """A waiting method of the dispatcher: a Ctrl-C in it leaves no lock of ``send``'s held (see :func:`_heal_locks`)."""

    @functools.wraps(method)
    def healed(*args: Any, **kwargs: Any) -> _T:
        before = _owned_locks()
        try:
            return method(*args, **kwargs)
        except BaseException:
            _heal_locks(before)
            raise

    return healed


@dataclass
class _Held:
    """A message the outbox could not take: kept in memory until it can."""

    webhook: Webhook
    thread_key: str | None
    bodies: list[tuple[str, bool]]
    skip: int  # leading bodies (a session header) that are not the receipt's
    receipt: Receipt
    blobs: dict[str, tuple[bytes, str]] | None = None  # image bytes, stored with the bodies (images.py)
    disarm: int | None = None  # the armed death notice these bodies replace (deleted when they are queued)


class Dispatcher:
    """The outbox of one ``CHAT_MAGIC_HOME`` and the threads that empty it."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._wake = _Wake()
        # notified when an outcome is recorded (wait_for sleeps on it); guards no data; a leaf
        self._changed = threading.Condition(threading.RLock())
        # set by stop(); cleared by ensure_running on the caller's thread (send): healed like _wake
        self._stop = _Wake()
        self._thread: threading.Thread | None = None
        # guards _lanes (and each lane's busy/current), _held, _held_reason, _watchers, _thread; a leaf:
        # no outbox call, no other lock inside (reentrant: a signal handler may run while this thread holds it)
        self._lock = threading.RLock()
        self._lanes: dict[str, _Lane] = {}
        self._owed: list[Callable[[], None]] = []  # outbox writes after an answer that failed (disk full)
        self._held: list[_Held] = []  # messages the outbox could not take (locked, full): queued later, in order
        # one drainer of _held at a time, so kept messages are queued in order; taken before the outbox gate
        # and before _lock (_drainer names its holder: an interrupt cannot leave it held, see _heal_locks)
        self._drain_lock = threading.Lock()
        self._drainer: int | None = None  # the thread draining: an interrupt cannot leave the drain lock held
        self._held_reason = ""
        self._watchers: list[Receipt] = []
        self.mine: set[int] = set()  # ids this process queued
        self.reported: set[int] = set()  # ids whose failure the caller has already been told
        self._orphaned = False  # a claim may have been cut short by an interrupt: put it back

    # -- caller side -----------------------------------------------------

    def submit(self, webhook: Webhook, payloads: list[dict[str, Any]], *, skip: int = 0, keep_on_fault: bool = False,
               figures: Any = None, disarm: int | None = None) -> Receipt:
        """Queue built payloads in one transaction; the receipt covers those after the first ``skip``.

        With ``keep_on_fault``, an outbox that cannot be written (locked,
        disk full) does not lose the message: it is kept in memory, in order,
        and queued by the worker as soon as the outbox works again. Else the
        caller gets the one-line :class:`OutboxError`. ``figures``
        (:class:`chat_magic.images.Figures`): the images' bytes go into the
        outbox with the bodies that show them. ``disarm``: the id of the armed
        death notice this completion card replaces, deleted in the same
        transaction (see :meth:`Outbox.enqueue`; a card kept in memory keeps
        it armed until it is queued).
        """
        held = _make_held(self, webhook, payloads, skip, figures, disarm)
        if self._held:
            if keep_on_fault:  # behind the ones already kept: order is kept, and the caller does not wait
                self._keep(held)
                return held.receipt
            self._drain_held(blocking=False)  # older kept messages first, if the outbox takes them now
        try:
            self._queue(held)
        except OutboxError as e:
            if not keep_on_fault:
                raise
            self._keep(held, e)
        return held.receipt

    def _queue(self, held: _Held, *, patient: bool = False) -> None:
        ids = self.outbox.enqueue(held.webhook, held.thread_key, held.bodies, patient=patient, blobs=held.blobs,
                                  disarm=held.disarm)
        self.mine.update(ids)
        held.receipt._queued(ids[held.skip:])
        self.ensure_running()
        self._wake.set()

    def _adopt(self, held: _Held) -> None:
        """Queue a message sent from inside the outbox (a signal handler), behind what is kept in memory."""
        held.receipt._d = self
        with self._lock:
            self._held.append(held)
        self._drain_held(blocking=False)
        self.ensure_running()
        self._wake.set()

    def _keep(self, held: _Held, e: OutboxError | None = None) -> None:
        """Keep a message in memory; the first one of an outage is said in one line."""
        with self._lock:
            first = not self._held
            self._held.append(held)
            if e is not None:
                self._held_reason = str(e)
        if first and e is not None:
            _say(f"{e}; the message is kept in memory and queued as soon as the outbox works again")
        self.ensure_running()
        self._wake.set()

    # -- what a Receipt and the exit summary use ------------------------------------

    @property
    def held_reason(self) -> str:
        """Why messages are kept in memory (the outbox's last error), ``""`` when none is."""
        return self._held_reason

    def held_count(self) -> int:
        """How many messages wait in memory for the outbox to work again."""
        return len(self._held)

    def drain_held(self, *, patient: bool = False) -> bool:
        """Queue the messages kept in memory; True when none is left (see ``submit``'s ``keep_on_fault``)."""
        return self._drain_held(patient=patient)

    def _drain_held(self, *, patient: bool = False, blocking: bool = True) -> bool:
        """Queue kept messages, oldest first (one drainer at a time); return whether none is left."""
        if not self._held:
            return True
        if not self._drain_lock.acquire(blocking=blocking):
            return not self._held
        self._drainer = threading.get_ident()
        try:
            while self._held:
                try:
                    self._queue(self._held[0], patient=patient)
                except OutboxError as e:
                    self._held_reason = str(e)
                    return False
                with self._lock:
                    done = self._held.pop(0)
                if done.disarm is not None:  # a completion card: the exit waits for it too (deadman.exit_wait)
                    from .deadman import mark_important

                    mark_important(done.receipt)
            return True
        finally:
            (setattr(self, "_drainer", None), self._drain_lock.release())  # type: ignore[func-returns-value]  # one line: no interrupt between

    def wake(self) -> None:
        """Wake the worker now (something was queued, or another process's rows are due)."""
        self._wake.set()

    def ensure_running(self) -> None:
        if _late_mode():
            return  # after chat_magic's exit hook: no new thread (it might never run); send() delivers inline
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="chat_magic-delivery", daemon=True)
                self._thread.start()

    @_healing
    def wait_for(self, ids: list[int], timeout: float | None) -> bool:
        """Wait until every id is sent or failed (or gone from the outbox); return whether they all are.

        A Ctrl-C while waiting (the usual way out of a long ``wait()``) leaves
        no lock held: a lane reporting an outcome would wait for it for good.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.ensure_running()
        while True:
            rows = self.outbox.resolve(ids)
            if all(r.state in (SENT, FAILED) for r in rows):
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            with self._changed:
                self._changed.wait(0.25 if left is None else min(0.25, left))

    @_healing
    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until nothing this outbox holds (or this process holds in memory) is waiting.

        False when something is left: not delivered in time, failed, kept in
        memory, or waiting in the configured outbox while a temporary one
        stands in (said in one line on stderr).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        _adopt_late()
        while not self._drain_held(patient=True):
            if deadline is not None and time.monotonic() >= deadline:
                _say(f"{len(self._held)} message(s) still kept in memory: {self._held_reason}")
                return False
            time.sleep(0.2)
        ids = self.outbox.unfinished_ids()
        ok = True
        if ids:
            self._wake.set()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = self.wait_for(ids, left) and all(r.state == SENT for r in self.outbox.resolve(ids))
        stranded = self.outbox.stranded()
        if stranded:
            _say(f"{stranded} message(s) still wait in the outbox {self.outbox.configured}, which this process cannot use: "
                 f"{self.outbox.problem}")
            return False
        return ok

    def deliver_now(self, ids: list[int], timeout: float) -> bool:
        """Deliver in this thread, paced, until ``ids`` are sent or failed; return whether they are.

        For a send after chat_magic's exit hook ran: the worker is stopped and
        a new thread might never run (interpreter shutdown).
        """
        deadline = time.monotonic() + timeout
        lane = _Inline()
        while True:
            rows = self.outbox.resolve(ids)
            if all(r.state in (SENT, FAILED) for r in rows):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            busy = self._busy()
            ready = self.outbox.next_ready(time.time(), exclude=busy)
            if ready is None or ready > 0:
                time.sleep(min(left, 0.05 if ready is None else ready))
                continue
            job = self.outbox.claim(time.time(), interval=settings.interval, lease=settings.lease, exclude=busy)
            if job is not None:
                self._deliver(job, lane)  # type: ignore[arg-type]

    def watch(self, receipt: Receipt) -> None:
        with self._lock:
            self._watchers.append(receipt)
        self.ensure_running()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop claiming; give requests in flight up to ``timeout`` seconds to finish and be recorded."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)  # first: it may hand one more job to a lane
        with self._lock:
            lanes = [lane.thread for lane in self._lanes.values()]
            for lane in self._lanes.values():
                lane.jobs.put(None)  # an idle lane ends now, a busy one after its request
        for t in lanes:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    # -- dispatcher thread ---------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self._turn()
            if wait:
                self._wake.wait(wait)
                self._wake.clear()

    def _turn(self) -> float:
        """One :meth:`_step`; never lets an error (nor an asynchronous exception) end the worker."""
        try:
            return self._step()
        except Exception as e:  # never die: log (redacted) and go on
            log.warning("chat_magic: delivery worker error: %s", redact(f"{type(e).__name__}: {e}"))
            return 1.0
        except BaseException as e:  # an asynchronous exception: a claim it cut short must not be left behind
            _heal_locks(set())
            log.warning("chat_magic: delivery worker interrupted: %s", type(e).__name__)
            self._orphaned = True
            return 0.05

    def _release_orphans(self) -> bool:
        """Put back rows this process claimed that no lane holds (a claim cut short); return whether done."""
        if not self._orphaned:
            return True
        with self._lock:
            keep = {lane.current for lane in self._lanes.values() if lane.current is not None}
            keep |= {j.id for lane in self._lanes.values() for j in list(lane.jobs.queue) if j is not None}
        try:
            self.outbox.release_mine(keep)
        except OutboxError:
            return False
        self._orphaned = False
        return True

    def _step(self) -> float:
        """Hand one message to its space's lane if one is ready; return how long to sleep (0: go on)."""
        _adopt_late(self)
        if not self._settle() or not self._release_orphans() or not self._drain_held(patient=True):
            return 1.0  # the outbox cannot be written yet
        busy = self._busy()
        if len(busy) >= MAX_LANES:
            return settings.idle_poll  # a lane that finishes wakes us
        now = time.time()
        ready = self.outbox.next_ready(now, exclude=busy)
        if ready is None:
            return settings.idle_poll
        if ready > 0:
            return min(ready, settings.idle_poll)
        _import_requests()  # now, not between taking the pacing slot and sending
        job = self.outbox.claim(now, interval=settings.interval, lease=settings.lease, exclude=busy)
        if job is None:
            return 0.05
        self._hand(job)
        return 0.0

    def _busy(self) -> set[str]:
        with self._lock:
            return {k for k, lane in self._lanes.items() if lane.busy}

    def _hand(self, job: Job) -> None:
        with self._lock:
            lane = self._lanes.get(job.space_key)
            if lane is None:
                lane = self._lanes[job.space_key] = _Lane(self, job.space_key)
                lane.thread.start()
            lane.busy = True
            lane.jobs.put(job)

    def _retire(self, lane: _Lane) -> bool:
        """Whether an idle lane may end (it is forgotten under the lock, so no job is handed to it after)."""
        with self._lock:
            if lane.busy or any(j is not None for j in list(lane.jobs.queue)):
                return False
            if self._lanes.get(lane.space_key) is lane:
                del self._lanes[lane.space_key]
            return True

    def _settle(self) -> bool:
        """Make the outbox writes owed since a storage fault, oldest first; return whether none is left."""
        while self._owed:
            try:
                self._owed[0]()
            except OutboxError:
                return False
            self._owed.pop(0)
            self._finished()
        return True

    def _record(self, write: Callable[[], None]) -> None:
        """Write an outcome to the outbox; if it cannot be written now, owe it (never lose a delivery).

        Interrupted (an asynchronous exception), it is owed too: each outcome
        write may be made twice.
        """
        try:
            write()
        except OutboxError as e:
            log.warning("chat_magic: %s; will record the outcome when the outbox works again", e)
            self._owed.append(write)
        except BaseException:
            self._owed.append(write)
            raise

    # -- a lane ----------------------------------------------------------

    def _deliver(self, job: Job, lane: _Lane) -> None:
        """POST one job and record what the answer means: delivered, retry later, or refused for good.

        Delivered means Google answered: a 2xx whose JSON names the created
        message. Anything else that is not a refusal (a proxy's page, an empty
        200, a redirect, which is never followed) is retried. The body is read
        to :data:`REPLY_CAP` bytes; every error text is scrubbed with this
        webhook's key and token in every spelling before it is kept or shown.
        """
        requests = _import_requests()  # no import statement: late in shutdown none works

        webhook = self.outbox.webhook(job.dest)
        if job.images:  # upload its figures first (not paced: only the POST is)
            from . import images

            if not images.fill(self, job):
                return
        log.debug("chat_magic: POST message %s to %s (attempt %d, carries %d more)",
                  job.id, webhook.redacted, job.attempts, job.merged)
        try:
            resp = lane.http().post(
                webhook.request_url(request_id=job.request_id, threaded=bool(job.thread_key)),
                data=job.payload.encode("utf-8"),
                timeout=(settings.connect_timeout, settings.read_timeout),
                allow_redirects=False,
                stream=True,
            )
            try:
                body = _read_capped(resp)
            finally:
                resp.close()
        except requests.RequestException as e:
            self._transient(job, 0, "NETWORK", scrub_error(_describe(e, webhook), webhook))
            return
        code = resp.status_code
        if 200 <= code < 300:
            created = _created(body)
            if created is None:
                self._not_delivered(job, code, webhook, _not_an_answer(code, body, resp.headers.get("Content-Type", "")))
                return
            name, thread = created
            free = time.time() + settings.gap_after_answer
            self._record(lambda: self.outbox.ack(job, name, thread, space_free_at=free))
            log.debug("chat_magic: message %s delivered as %s", job.id, name)
            return
        if 300 <= code < 400:
            self._not_delivered(job, code, webhook, _redirected(code, resp.headers.get("Location", "")))
            return
        status, message = _parse_error(body)
        status, message = scrub_error(status, webhook, limit=120), scrub_error(message, webhook)
        if code in RETRY_STATUS:
            self._transient(job, code, status, f"{code} {status}: {message}".strip(), _retry_after(resp))
            return
        reason = explain(code, status, message)
        free = time.time() + settings.gap_after_answer
        self._record(lambda: self.outbox.fail(job, code=code, status=status, error=reason, space_free_at=free))
        log.warning("chat_magic: message not delivered: %s", reason)

    def _not_delivered(self, job: Job, code: int, webhook: Webhook, why: str) -> None:
        """An answer that is not Google's (a 2xx naming no message, a 3xx): one line per kind, then retried."""
        why = scrub_error(why, webhook)
        kind = "redirect" if 300 <= code < 400 else "no message"
        _say_once(f"answer {kind} {webhook.base}", f"{_host_of(webhook.base)} answered {why}; retrying "
                                                     "(a proxy, a firewall or a captive portal may stand in the way)")
        self._transient(job, code, "", why)

    def _transient(self, job: Job, code: int, status: str, error: str, retry_after: float | None = None) -> None:
        if time.time() - job.created_at > settings.give_up_after:
            reason = f"gave up after {job.attempts} attempts: {error}"
            free = time.time() + settings.gap_after_answer
            self._record(lambda: self.outbox.fail(job, code=code, status=status, error=reason, space_free_at=free))
            log.warning("chat_magic: message not delivered: %s", reason)
            return
        delay = backoff(job.attempts, retry_after)
        log.info("chat_magic: %s; retrying in %.1f s", error, delay)
        free = time.time() + max(settings.gap_after_answer, delay if code == 429 else 0.0)
        self._record(lambda: self.outbox.retry_later(job, delay, code=code, status=status, error=error, space_free_at=free))

    def _finished(self) -> None:
        with self._changed:
            self._changed.notify_all()
        if not self._watchers:
            return
        with self._lock:
            watchers, self._watchers = self._watchers, []
        keep = []
        for r in watchers:
            try:
                done = r.done()
            except OutboxError:
                done = False
            if done:
                r._fire()
            else:
                keep.append(r)
        with self._lock:
            self._watchers.extend(keep)


_requests_ready = False
_requests: Any = None  # the module, once imported: a send late in shutdown (no import works then) still has it


def _import_requests() -> Any:
    global _requests_ready, _requests
    if _requests is None:
        import requests

        _guard_urllib3_logs()
        _requests, _requests_ready = requests, True
    return _requests


def _new_session() -> Any:
    requests = _import_requests()
    session = requests.Session()
    session.headers["Content-Type"] = "application/json; charset=UTF-8"
    session.headers["User-Agent"] = "chat_magic"
    return session


class RedactingFilter(logging.Filter):
    """Scrubs key and token from a log record: urllib3 logs request URLs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = scrub_known(redact(message))  # any spelling of a webhook this process knows, and any key=/token=
        if clean != message:
            record.msg, record.args = clean, ()
        return True


_redacting_filter = RedactingFilter()


def _guard_urllib3_logs() -> None:
    for name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry", "requests", "chat_magic"):
        logger = logging.getLogger(name)
        if _redacting_filter not in logger.filters:
            logger.addFilter(_redacting_filter)


_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused (is the server running, and is the port right?)",
    errno.ECONNRESET: "connection reset (by the server, or a proxy or firewall on the way)",
    errno.ETIMEDOUT: "timed out connecting (is the host up? a firewall?)",
    errno.ENETUNREACH: "network unreachable (offline?)",
    errno.EHOSTUNREACH: "host unreachable (offline, or a firewall?)",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed by the server while sending",
}


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions behind it (causes, contexts, urllib3's ``reason``), outermost first."""
    out: list[BaseException] = []
    todo: list[BaseException | None] = [e]
    while todo and len(out) < 20:
        x = todo.pop(0)
        if x is None or any(x is seen for seen in out):
            continue
        out.append(x)
        reason = getattr(x, "reason", None)
        todo += [x.__cause__, x.__context__, reason if isinstance(reason, BaseException) else None]
        todo += [a for a in getattr(x, "args", ()) if isinstance(a, BaseException)]
    return out


def _plain_words(e: BaseException) -> str | None:
    """A network error in plain words when it is a common one (refused, reset, timed out, no such host), else None."""
    import socket

    import requests

    chain = _chain(e)
    if any(isinstance(x, socket.gaierror) for x in chain) or any(type(x).__name__ == "NameResolutionError" for x in chain):
        return "the host name could not be resolved (offline, or a typo in the host?)"
    for x in chain:
        words = _ERRNO_WORDS.get(getattr(x, "errno", None) or -1)
        if words:
            return words
    if any(type(x).__name__ == "RemoteDisconnected" for x in chain):
        return "connection closed by the server without an answer (the server or a proxy dropped it)"
    if isinstance(e, requests.ConnectTimeout):
        return "timed out connecting (is the host up? a firewall?)"
    if isinstance(e, requests.ReadTimeout):
        return f"no answer within {settings.read_timeout:g} s (timed out; the message is sent again with the same requestId)"
    return None


def _describe(e: BaseException, webhook: Webhook | None = None) -> str:
    """A short, scrubbed description of a network error, in plain words for the common ones.

    ``requests`` puts the whole URL, key and token included, into its
    messages: the detail is scrubbed (with ``webhook``'s own values) before it is cut.
    """
    import requests

    words = _plain_words(e)
    if words:
        return f"network: {words}"
    if isinstance(e, requests.Timeout):
        kind = "timed out"
    elif isinstance(e, requests.ConnectionError):
        kind = "connection failed"
    else:
        kind = type(e).__name__
    inner = e
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    detail = scrub_error(inner.args[0] if getattr(inner, "args", None) else inner, webhook, limit=200)
    return f"network: {kind} ({detail})"


def _redirected(code: int, location: str) -> str:
    """What a 3xx said, showing only where it points (its host): a Location may carry the key and token."""
    from urllib.parse import urlsplit

    try:
        host = urlsplit(location).hostname or ""
    except ValueError:
        host = ""
    where = f" to {host}" if host else ""
    return f"{code} redirect{where} (not followed)"


def _host_of(url: str) -> str:
    """``host:port`` of a URL without its path or query, for a line on stderr."""
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or "the server"


class Receipt:
    """The handle ``send`` returns at once. Its repr is redacted.

    ``ids`` are the message's outbox ids: empty while the message is kept in
    memory because the outbox could not take it yet (``keep_on_fault``).
    """

    def __init__(self, dispatcher: Dispatcher, ids: list[int], destination: str) -> None:
        self._d = dispatcher
        self.ids = tuple(ids)
        self._held = not ids
        self.destination = destination
        self._callbacks: list[Callable[[Receipt], None]] = []  # added and not called yet
        self._cb_lock = threading.Lock()  # guards _callbacks: each callback is taken (and called) once; a leaf
        self._final: tuple[str, str | None, list[Delivered]] | None = None  # (status, error, results), once it cannot change

    def _queued(self, ids: list[int]) -> None:
        self.ids, self._held = tuple(ids), False

    def __repr__(self) -> str:
        try:
            status = self.status
        except OutboxError:
            status = "unknown (outbox unreadable)"
        return f"<Receipt {list(self.ids)} {status} to {self.destination}>"

    def _read(self) -> tuple[list[Any], dict[int, str]]:
        """Each part's row (None where no longer in the outbox), and why each such part is gone (``Outbox.account``)."""
        return self._d.outbox.account(self.ids)

    def _judge(self, found: list[Any], gone: dict[int, str]) -> tuple[str, str | None, list[Delivered]]:
        """(status, error, results) from what the outbox holds; remembered once it can no longer change.

        Delivered is final (a delivered part later pruned from the outbox reads
        ``sent``, its name no longer known); so is dropped. A part the space
        refused is not remembered: ``chat-magic outbox retry`` may queue it again.
        """
        if self._final is not None:
            return self._final
        rows = [r for r in found if r is not None]
        results = [Delivered(r.name, r.thread_name) if r is not None else Delivered(None, None)
                   for i, r in zip(self.ids, found) if r is not None or gone.get(i) == SENT]
        lost = [i for i, why in gone.items() if why != SENT]
        refused = [r for r in rows if r.state == FAILED]
        if refused or lost:
            status = "failed"
            error = next((r.error for r in refused if r.error), None) or (self._gone_text(lost[0], gone[lost[0]]) if lost else None)
        else:
            status = "sent" if all(r.state == SENT for r in rows) else "pending"
            error = next((r.error for r in rows if r.error), None)
        outcome = (status, error, results)
        if status == "sent" or DROPPED in gone.values():
            self._final = outcome
        return outcome

    @property
    def outbox(self) -> Outbox | None:
        """The outbox holding this message (None while it is kept in memory before any dispatcher took it)."""
        return self._d.outbox if self._d is not None else None

    @property
    def status(self) -> str:
        """``"pending"``, ``"sent"`` or ``"failed"`` (failed if any part failed, was dropped or was lost)."""
        if self._held:
            return "pending"
        return self._judge(*self._read())[0]

    def done(self) -> bool:
        return self.status != "pending"

    @property
    def error(self) -> str | None:
        """The one-line reason when delivery failed, else the last transient error, else None."""
        if self._held:
            reason = self._d.held_reason if self._d is not None else ""
            return f"kept in memory: {reason}" if reason else None
        return self._judge(*self._read())[1]

    def _gone_text(self, i: int, why: str) -> str:
        where = f"message {i} is no longer in the outbox {self._d.outbox.path}"
        if why == DROPPED:
            return f"{where}: it was dropped (chat-magic outbox drop)"
        return f"{where} and no record says it was delivered: lost with a damaged outbox, or removed by an older chat_magic"

    def results(self) -> list[Delivered]:
        """Each delivered part's ``name`` and ``thread.name``; None for a part pruned from the outbox since (no longer known)."""
        if self._held:
            return []
        return self._judge(*self._read())[2]

    def wait(self, timeout: float | None = 30.0) -> Delivered:
        """Block until delivered and return the message's ``name`` and ``thread.name``.

        Raises :class:`DeliveryFailed` when the space refused it (or it was
        dropped from the outbox) and :class:`DeliveryTimeout` when it is still
        queued after ``timeout`` seconds (it stays queued and will still be
        delivered); an :class:`OutboxError` when the outbox cannot be read.
        ``name`` is None when the message was delivered but pruned from the
        outbox since (``CHAT_MAGIC_KEEP_SENT``): its name is no longer known.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._held:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeliveryTimeout(f"not delivered within {timeout:g} s: still kept in memory ({self.error})")
            if self._d is None:  # sent from a signal handler: queued by the call it interrupted, or now
                _adopt_late()
            else:
                self._d.drain_held(patient=True)
            if self._held:
                time.sleep(0.1)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._final is None and not self._d.wait_for(list(self.ids), left):
            last = self.error
            more = f"; last error: {last}" if last else ""
            raise DeliveryTimeout(f"not delivered within {timeout:g} s (still queued, will retry){more}")
        found, gone = (None, {}) if self._final is not None else self._read()
        for r in found or ():
            if r is not None and r.state == FAILED:
                self.mark_reported()
                raise DeliveryFailed(r.error or "delivery failed", code=r.error_code or 0, status=r.error_status or "")
        status, error, results = self._judge(found or [], gone)
        if status == "failed":
            self.mark_reported()
            raise DeliveryFailed(error or "delivery failed")
        return results[0] if results else Delivered(None, None)

    def mark_reported(self) -> None:
        """The caller has told the user about this message's failure: the exit summary skips it."""
        self._d.reported.update(self.ids)

    def add_done_callback(self, fn: Callable[[Receipt], None]) -> None:
        """Call ``fn(receipt)`` once, from the delivery thread, when this is sent or failed.

        Added after completion, ``fn`` is called at once (in this thread).
        The receipt is registered with the dispatcher *before* "done?" is
        checked: a delivery that finishes between the two is then seen by
        one side or the other (or both: :meth:`_fire` hands each callback
        out once).
        """
        with self._cb_lock:
            self._callbacks.append(fn)
        self._d.watch(self)
        try:
            done = self.done()
        except OutboxError:
            done = False  # the dispatcher checks again after each delivery
        if done:
            self._fire()

    def _fire(self) -> None:
        """Call the callbacks not called yet, each once (whoever calls this, however often)."""
        with self._cb_lock:
            due, self._callbacks = self._callbacks, []
        for fn in due:
            try:
                fn(self)
            except Exception as e:
                log.warning("chat_magic: receipt callback failed: %s", redact(e))


def _make_held(d: Dispatcher | None, webhook: Webhook, payloads: list[dict[str, Any]], skip: int,
               figures: Any = None, disarm: int | None = None) -> _Held:
    """A message as the outbox will store it, with its receipt (ids come when it is queued).

    ``figures`` (:class:`chat_magic.images.Figures`): the images' bytes go into
    the outbox with the bodies that show them.
    """
    thread_key = (payloads[0].get("thread") or {}).get("threadKey") if payloads else None
    bodies: list[Any] = [(json.dumps(p, ensure_ascii=False, separators=(",", ":")), set(p) <= {"text", "thread"}) for p in payloads]
    blobs = None
    if figures is not None and figures.postable:
        bodies, blobs = [(b, m, figures.column(b)) for b, m in bodies], figures.blobs()
    return _Held(webhook, thread_key, bodies, skip, Receipt(d, [], webhook.redacted), blobs, disarm)  # type: ignore[arg-type]


# -- the process-wide dispatchers, one per outbox folder ------------------------

_dispatchers: dict[str, Dispatcher] = {}
# guards _dispatchers (making one: open, drain the legacy file, take over orphans); the first lock
# of the order: the outbox gate, config's, webhook's and pacing's locks may be taken inside, never it inside them
_dlock = threading.RLock()
_registered = False  # _at_exit is registered (once per process, inherited by a forked child)
_exited = False  # _at_exit has run: a later send delivers inline, or says it could not
_state = threading.local()  # .frame: the send()/flush() this thread is in (a signal handler may run in there)
_late: dict[str, collections.deque[tuple[Any, _Held]]] = {}  # sent from inside the outbox: queued right after


def _inside() -> bool:
    """Whether this thread is already inside chat_magic's delivery (a signal handler interrupted it there).

    The mark is the frame of the ``send``/``flush`` call, looked for on the
    stack: a mark left by an interrupt (on the line that clears it) is stale,
    not a reason to hold every later send back.
    """
    f = getattr(_state, "frame", None)
    if f is not None:
        g: Any = sys._getframe(1)
        while g is not None:
            if g is f:
                return True
            g = g.f_back
        _state.frame = None
    return _outbox.inside()


def _locks() -> list[Any]:
    """The reentrant locks on the way of ``send``."""
    ds = list(_dispatchers.values())
    return ([config.settings_lock(), webhook_module.known_lock(), _dlock] + [d._lock for d in ds]
            + [d._changed._lock for d in ds] + [d._wake.lock for d in ds] + [d._stop.lock for d in ds])  # type: ignore[attr-defined]


def _owned_locks() -> set[int]:
    return {id(lk) for lk in _locks() if lk._is_owned()}


def _heal_locks(before: set[int]) -> None:
    """Give back every lock this thread took since ``before`` (an interrupt cut a call short)."""
    me = threading.get_ident()
    for lk in _locks():
        if id(lk) not in before and lk._is_owned():
            lk._release_save()
    for d in list(_dispatchers.values()):
        if d._drainer == me:
            (setattr(d, "_drainer", None), d._drain_lock.release())  # type: ignore[func-returns-value]
    _outbox.heal_gate()


def _late_mode() -> bool:
    """After chat_magic's exit hook ran, or once the interpreter finalizes: no thread may be started."""
    return _exited or sys.is_finalizing()


def _send_later(webhook: Webhook, payloads: list[dict[str, Any]], skip: int, figures: Any = None,
                disarm: int | None = None) -> Receipt:
    """Keep a message sent from inside the outbox (a signal handler) in memory: no lock, no SQLite.

    The outer call (when it leaves ``send``), the worker or the exit hook
    queues it right after; a completion card keeps its ``disarm``, so the
    block's death notice goes in the transaction that queues the card.
    """
    home = config.home()
    held = _make_held(_dispatchers.get(str(hosts.outbox_path(home))), webhook, payloads, skip, figures, disarm)
    _late.setdefault(str(hosts.outbox_path(home)), collections.deque()).append((home, held))
    return held.receipt


def _adopt_late(d: Dispatcher | None = None, *, force: bool = False) -> None:
    """Queue what signal handlers sent from inside the outbox (only ``d``'s, from its worker).

    ``force``: the call they interrupted, on its way out.
    """
    if not _late or (not force and _inside()):
        return
    for path, waiting in list(_late.items()):
        if d is not None and _dispatchers.get(path) is not d:
            continue
        while waiting:
            home, held = waiting.popleft()
            try:
                _dispatcher_at(home)._adopt(held)
            except OutboxError as e:
                _say(f"a message sent from a signal handler could not be queued: {e}")


def dispatcher() -> Dispatcher:
    """The dispatcher of this host's outbox in the current ``CHAT_MAGIC_HOME`` (made on first use)."""
    return _dispatcher_at(config.home())


def _dispatcher_at(home: Any) -> Dispatcher:
    global _registered
    path = str(hosts.outbox_path(home))
    d = _dispatchers.get(path)
    if d is not None:
        return d
    with _dlock:
        d = _dispatchers.get(path)
        if d is None:
            if not _registered:
                atexit.register(_at_exit)
                _registered = True
            d = _dispatchers[path] = open_dispatcher(path)
            _drain_legacy(home)
            _take_over(d, home)
    if fire_orphans(d.outbox):  # blocks of processes that died on this host unreported (no watcher)
        d.ensure_running()
    return d


def dispatchers() -> list[Dispatcher]:
    """Every dispatcher this process runs: this host's, and an old single file being drained."""
    return list(_dispatchers.values())


def running_dispatcher(path: str | os.PathLike[str]) -> Dispatcher | None:
    """This process's dispatcher of the outbox file ``path`` if it drains that file already, else None."""
    return _dispatchers.get(str(path))


def open_dispatcher(path: str | os.PathLike[str]) -> Dispatcher:
    """A new dispatcher for the outbox file ``path``, paced through Redis when one is configured.

    It is not registered: the caller stops it and closes its outbox (``chat-magic
    outbox flush`` for another host's file). :func:`dispatcher` is this host's.

    Raises :class:`OutboxError` when not even a temporary outbox can be made.
    """
    try:
        box = Outbox(path, pacer=pacing.SqlitePacer())  # both pacers live in pacing.py; the cluster's is added below
    except (sqlite3.Error, OSError) as e:
        raise OutboxError(f"cannot open an outbox ({path}, nor a temporary one): {e}") from None
    d = Dispatcher(box)
    d.outbox.cluster = pacing.cluster_slot()
    return d




def _drain_legacy(home: os.PathLike[str]) -> None:
    """Deliver what waits in the old single ``outbox.sqlite3`` (before per-host files); nothing new goes there."""
    old = _outbox.legacy_to_drain(home)
    if old is not None and str(old) not in _dispatchers:
        _dispatchers[str(old)] = open_dispatcher(old)
        _dispatchers[str(old)].ensure_running()


def _take_over(d: Dispatcher, home: os.PathLike[str]) -> None:
    """Move what previous hosts (a container before a restart) left in this folder into this host's outbox.

    Before this process queues anything, so their messages go first. A file
    some process still uses is never opened (see ``hosts.claim_orphan``).
    """
    if d.outbox.path != d.outbox.configured:
        return  # a temporary outbox stands in: leave the folder alone
    try:
        files = hosts.orphans(Path(home))
    except OSError:  # a folder that cannot be listed: nothing to take over from here
        return
    for f in files:
        if d.outbox.take_over(f.path):
            d.ensure_running()
    d.mine.update(d.outbox.adopted)  # the death notices of the jobs that host ran: this process's exit waits for them


_inherited: list[Dispatcher] = []


def _after_fork_in_child() -> None:
    """A forked child (a data-loader worker, multiprocessing) starts afresh on first use.

    The worker threads do not survive a fork, and a lock another parent thread
    held at the fork stays held in the child forever: every lock on the way of
    ``send`` is made anew (the outbox's own are, in outbox.py). The parent's
    objects are kept (not closed) so nothing touches the parent's handles
    from the child.
    """
    global _dlock, _state
    _inherited.extend(_dispatchers.values())
    _dispatchers.clear()
    _dlock = threading.RLock()
    _state = threading.local()
    _late.clear()
    config.after_fork_in_child()
    webhook_module.after_fork_in_child()
    pacing.after_fork_in_child()  # a Redis connection is not shared with the parent


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@_healing
def send(
    text: str | None = None,
    *,
    to: str | Webhook | None = None,
    thread_key: str | None = None,
    cards: list[dict[str, Any]] | None = None,
    fallback_text: str | None = None,
    truncate: bool = False,
    keep_on_fault: bool = False,
    header: str | None = None,
    image: Any = None,
    figures: Any = None,
    disarm: int | None = None,
) -> Receipt:
    """Build the message once, with its real envelope, and queue it (see ``chat_magic.send``).

    ``header``: a text queued just before the message, in the same
    transaction (a session's announcement): both or neither. The receipt is
    the message's. ``keep_on_fault``: see :meth:`Dispatcher.submit`; front ends
    that must never lose a notice (the magics, ``notify_when_done``) set it.
    ``image``: a figure (or a list of them) shown in a card under the text;
    ``figures``: already collected ones (:class:`chat_magic.images.Figures`)
    whose image widgets the cards carry. ``disarm``: see :meth:`Dispatcher.submit`.

    The thread-key rule is checked here, where every front end passes (the
    magics, ``chat_magic.send``, ``chat-magic send --thread``, the composer,
    the progress lines): a blank or too long key is a one-line ConfigError.
    """
    # an interrupt, even on a line that releases (or resolving ``to``): @_healing leaves no lock held
    return _send(text, to=to, thread_key=thread_key, cards=cards, fallback_text=fallback_text, truncate=truncate,
                 keep_on_fault=keep_on_fault, header=header, image=image, figures=figures, disarm=disarm)


def _send(text: str | None, *, to: str | Webhook | None, thread_key: str | None, cards: list[dict[str, Any]] | None,
          fallback_text: str | None, truncate: bool, keep_on_fault: bool, header: str | None, image: Any,
          figures: Any, disarm: int | None) -> Receipt:
    thread_key = rules.validate_thread_key(thread_key, option="thread_key")
    webhook = config.resolve(to)
    if image is not None:
        from . import images

        figures = images.Figures.collect(list(image) if isinstance(image, (list, tuple)) else [image],
                                         to=to if isinstance(to, str) else None, max_figures=10)
        if not figures.images and figures.problems:
            raise MessageError(figures.problems[0])
        text, cards = images.attach(text, cards, figures)
    payloads = build_payloads(text, cards=cards, thread_key=thread_key, truncate=truncate, fallback_text=fallback_text, webhook=webhook)
    lead = build_payloads(header, thread_key=thread_key, webhook=webhook) if header else []
    if _inside():  # a signal handler, run while this thread was in here: no lock may be waited for
        return _send_later(webhook, lead + payloads, len(lead), figures, disarm)
    try:
        _state.frame = sys._getframe()
        d = dispatcher()
        receipt = d.submit(webhook, lead + payloads, skip=len(lead), keep_on_fault=keep_on_fault, figures=figures,
                             disarm=disarm)
    finally:
        try:
            _adopt_late(force=True)  # still marked: a signal handler's send meanwhile joins the queue below
        finally:
            _state.frame = None
    if _late_mode():
        _deliver_late(d, receipt)
    return receipt


def _deliver_late(d: Dispatcher, receipt: Receipt) -> None:
    """A send after chat_magic's exit hook ran (an earlier atexit handler, a ``__del__``): deliver it now,
    bounded, or say in one line where it waits. Never raises, never hangs."""
    try:
        if sys.is_finalizing():  # module teardown (a __del__): HTTP cannot work now (urllib3 imports as it goes)
            what = "the interpreter is shutting down"
        elif receipt.ids and d.deliver_now(list(receipt.ids), max(0.5, settings.exit_timeout)) and receipt.status == "sent":
            return
        else:
            what = receipt.error or "not delivered in time"
    except Exception as e:  # shutting down: an import or a module may be gone
        what = f"{type(e).__name__}: {e}"
    _say(f"a message sent after chat_magic's exit hook is still queued ({what}); "
         "the next chat_magic process or `chat-magic outbox flush` delivers it")


def flush(timeout: float | None = 30.0) -> bool:
    if _inside():
        return False  # a signal handler inside send(): it cannot wait for the outbox it interrupted
    try:
        _state.frame = sys._getframe()
        return dispatcher().flush(timeout)
    finally:
        _state.frame = None


def shutdown(timeout: float = 5.0) -> None:
    """Stop every worker of this process (tests; interpreter exit)."""
    with _dlock:
        ds = list(_dispatchers.values())
        _dispatchers.clear()
    for d in ds:
        d.stop(timeout)
        d.outbox.close()


def _at_exit() -> None:
    """A bounded last chance for what this process queued; the rest stays in the outbox.

    Says in one line on stderr what was not delivered, unless the caller was
    told already, and loudly what could not even be queued.
    """
    global _exited
    deadline = time.monotonic() + max(0.0, settings.exit_timeout)
    try:
        _import_requests()  # while imports still work: a __del__ late in shutdown may still deliver
    except Exception:
        pass
    try:
        # nothing of chat_magic runs on this thread now: whatever it holds, an interrupt left (the worker would
        # wait on it, and this exit on the worker); a signal handler's exception can cut a heal short too
        _heal_locks(set())
        _outbox.heal_gate(outside=True)
    except Exception:
        pass
    try:
        _adopt_late(force=True)  # what a signal handler sent from inside the outbox, if the call it cut never returned
    except Exception as e:
        _say(f"a message sent from a signal handler could not be queued: {type(e).__name__}: {e}")
    for d in list(_dispatchers.values()):
        try:
            if not d.drain_held():
                _say(f"{d.held_count()} message(s) could not be queued and are lost with this process: {d.held_reason}")
            mine = [i for i in d.outbox.unfinished_ids() if i in d.mine]
            mine, longer = exit_wait(d, mine, settings)  # completion notices waiting: up to 30 s (the policy is deadman's)
            deadline = max(deadline, time.monotonic() + longer)
            left = deadline - time.monotonic()
            if mine and left > 0:
                d.wait_for(mine, left)
            d.stop(0.5)
            untold = sorted(d.mine - d.reported)
            rows = d.outbox.resolve(untold) if untold else []
            failed = [r for r in rows if r.state == FAILED]
            waiting = [r for r in rows if r.state not in (SENT, FAILED)]
            if failed:
                _say(f"{len(failed)} message(s) not delivered: {failed[0].error} (see: chat-magic outbox list)")
            if waiting and d.outbox.problem:  # a temporary outbox: say where it is
                home = d.outbox.path.parent
                _say(f"{len(waiting)} message(s) still queued in the temporary outbox {d.outbox.path}; "
                     f"deliver them with: CHAT_MAGIC_HOME={home} chat-magic outbox flush")
            elif waiting:
                _say(f"{len(waiting)} message(s) still queued; the next chat_magic process or `chat-magic outbox flush` delivers them")
        except Exception as e:
            _say(f"could not check what is left in the outbox: {type(e).__name__}: {e}")
    _exited = True  # from now on a send delivers inline (see _deliver_late)


hooks.entry["send"] = send  # chat_magic.send finds it late in shutdown, when no import works
