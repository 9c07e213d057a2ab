"""The background worker: send what the outbox holds, paced, retried, merged.

One daemon thread per process does all network I/O, so ``send`` only writes
to the outbox and returns. For each request the worker:

- takes the next message whose space may be posted to now (the outbox keeps
  one pacing slot per space, shared by every process: at most one request per
  ``interval`` seconds), merging short plain-text messages waiting behind it;
- POSTs it with its ``requestId`` (the same on every retry, so a retry after a
  lost reply creates no duplicate) and, with a thread key,
  ``messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD``;
- on a network error, a timeout, 408, 429 or 5xx, schedules a retry in the
  outbox with exponential backoff and jitter (``Retry-After`` honoured);
- on any other 4xx, keeps the message as ``failed`` with a one-line reason.

Every error text is redacted: ``requests`` puts the whole URL, key and token
included, into its exception messages.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from . import config, hosts, pacing
from .errors import DeliveryFailed, DeliveryTimeout
from .message import build_payloads
from .outbox import FAILED, SENT, Job, Outbox
from .webhook import Webhook, redact

log = logging.getLogger("chat_magic")
log.addHandler(logging.NullHandler())  # a library: no "last resort" lines on stderr from the worker thread

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass
class Settings:
    """Delivery knobs; change them with :func:`chat_magic.configure`."""

    interval: float = 1.1  # seconds between two requests to one space (quota: 1/s)
    # and at least this long after the last answer: the server counts a request when it
    # arrives, somewhere between our send and its answer, so pacing from the answer is safe
    # whatever the latency or the scheduling of several processes
    gap_after_answer: float = 1.02
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    backoff_base: float = 1.0
    backoff_cap: float = 15.0
    give_up_after: float = 24 * 3600.0  # a transient error older than this becomes final
    exit_timeout: float = float(os.environ.get("CHAT_MAGIC_EXIT_TIMEOUT", "3") or 3)
    idle_poll: float = 2.0  # how often an idle worker looks for other processes' rows

    @property
    def lease(self) -> float:
        return self.connect_timeout + self.read_timeout + 10.0


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
        delay = max(delay, min(retry_after, 300.0))
    return delay


def explain(code: int, status: str, message: str) -> str:
    """One line for a final refusal, saying what to do about it."""
    m = redact(message or "").strip()
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


def _parse_error(resp) -> tuple[str, str]:
    try:
        err = resp.json().get("error", {})
        status = str(err.get("status") or "")
        message = str(err.get("message") or "")
        for d in err.get("details") or []:
            if isinstance(d, dict) and d.get("reason"):
                status = f"{status} {d['reason']}".strip()
        return status, message
    except Exception:
        return "", (resp.text or "")[:300]


def _retry_after(resp) -> float | None:
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


class Dispatcher:
    """The outbox of one ``CHAT_MAGIC_HOME`` and the thread that empties it."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._wake = threading.Event()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._session = None
        self._watchers: list[Receipt] = []
        self.mine: set[int] = set()  # ids this process queued
        self.reported: set[int] = set()  # ids whose failure the caller has already been told

    # -- caller side -----------------------------------------------------

    def submit(self, webhook: Webhook, payloads: list[dict[str, Any]]) -> Receipt:
        thread_key = (payloads[0].get("thread") or {}).get("threadKey")
        bodies = [(_without_secrets(json.dumps(p, ensure_ascii=False, separators=(",", ":")), webhook), set(p) <= {"text", "thread"})
                  for p in payloads]
        ids = self.outbox.enqueue(webhook.url, webhook.space_key, thread_key, bodies)
        self.mine.update(ids)
        self.ensure_running()
        self._wake.set()
        return Receipt(self, ids, webhook.redacted)

    def ensure_running(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="chat_magic-delivery", daemon=True)
                self._thread.start()

    def wait_for(self, ids: list[int], timeout: float | None) -> bool:
        """Wait until every id is sent or failed; return whether they all are."""
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

    def flush(self, timeout: float | None = 30.0) -> bool:
        ids = self.outbox.unfinished_ids()
        if not ids:
            return True
        self._wake.set()
        if not self.wait_for(ids, timeout):
            return False
        return all(r.state == SENT for r in self.outbox.resolve(ids))

    def watch(self, receipt: Receipt) -> None:
        with self._lock:
            self._watchers.append(receipt)
        self.ensure_running()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    # -- worker ----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._step()
            except Exception as e:  # never die: log (redacted) and go on
                log.warning("chat_magic: delivery worker error: %s", redact(f"{type(e).__name__}: {e}"))
                wait = 1.0
            if wait:
                self._wake.wait(wait)
                self._wake.clear()

    def _step(self) -> float:
        """Send one message if one is ready; return how long to sleep (0: go on)."""
        now = time.time()
        ready = self.outbox.next_ready(now)
        if ready is None:
            return settings.idle_poll
        if ready > 0:
            return min(ready, settings.idle_poll)
        self._http()  # import requests now, not between taking the pacing slot and sending
        job = self.outbox.claim(now, interval=settings.interval, lease=settings.lease)
        if job is None:
            return 0.05
        self._deliver(job)
        self._finished()
        return 0.0

    def _http(self):
        if self._session is None:
            import requests

            _guard_urllib3_logs()

            self._session = requests.Session()
            self._session.headers["Content-Type"] = "application/json; charset=UTF-8"
            self._session.headers["User-Agent"] = "chat_magic"
        return self._session

    def _deliver(self, job: Job) -> None:
        import requests

        webhook_url = _request_url(job)
        log.debug("chat_magic: POST message %s to %s (attempt %d, carries %d more)",
                  job.id, redact(webhook_url), job.attempts, job.merged)
        try:
            resp = self._http().post(
                webhook_url,
                data=job.payload.encode("utf-8"),
                timeout=(settings.connect_timeout, settings.read_timeout),
                allow_redirects=False,
            )
        except requests.RequestException as e:
            self._transient(job, 0, "NETWORK", _describe(e))
            return
        code = resp.status_code
        if code == 200:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            self.outbox.ack(job, body.get("name"), (body.get("thread") or {}).get("name"),
                            space_free_at=time.time() + settings.gap_after_answer)
            log.debug("chat_magic: message %s delivered as %s", job.id, body.get("name"))
            return
        status, message = _parse_error(resp)
        if code in RETRY_STATUS:
            self._transient(job, code, status, f"{code} {status}: {redact(message)}".strip(), _retry_after(resp))
            return
        reason = explain(code, status, message)
        self.outbox.fail(job, code=code, status=status, error=reason, space_free_at=time.time() + settings.gap_after_answer)
        log.warning("chat_magic: message not delivered: %s", reason)

    def _transient(self, job: Job, code: int, status: str, error: str, retry_after: float | None = None) -> None:
        created = self.outbox.rows([job.id])[0].created_at
        if time.time() - created > settings.give_up_after:
            reason = f"gave up after {job.attempts} attempts: {error}"
            self.outbox.fail(job, code=code, status=status, error=reason, space_free_at=time.time() + settings.gap_after_answer)
            log.warning("chat_magic: message not delivered: %s", reason)
            return
        delay = backoff(job.attempts, retry_after)
        log.info("chat_magic: %s; retrying in %.1f s", error, delay)
        hold = max(settings.gap_after_answer, delay if code == 429 else 0.0)
        self.outbox.retry_later(job, delay, code=code, status=status, error=error, space_free_at=time.time() + hold)

    def _finished(self) -> None:
        with self._changed:
            self._changed.notify_all()
        if not self._watchers:
            return
        with self._lock:
            watchers, self._watchers = self._watchers, []
        keep = []
        for r in watchers:
            if r.done():
                r._fire()
            else:
                keep.append(r)
        with self._lock:
            self._watchers.extend(keep)


class RedactingFilter(logging.Filter):
    """Scrubs key and token from a log record: urllib3 logs request URLs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


_redacting_filter = RedactingFilter()


def _guard_urllib3_logs() -> None:
    for name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry", "requests"):
        logger = logging.getLogger(name)
        if _redacting_filter not in logger.filters:
            logger.addFilter(_redacting_filter)


def _request_url(job: Job) -> str:
    from .webhook import parse_webhook_url

    return parse_webhook_url(job.url).request_url(request_id=job.request_id, threaded=bool(job.thread_key))


def _describe(e: BaseException) -> str:
    """A short, redacted description of a network error."""
    import requests

    if isinstance(e, requests.Timeout):
        kind = "timed out"
    elif isinstance(e, requests.ConnectionError):
        kind = "connection failed"
    else:
        kind = type(e).__name__
    inner = e
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    detail = str(inner.args[0] if getattr(inner, "args", None) else inner)
    return redact(f"network: {kind} ({detail[:200]})")


class Receipt:
    """The handle ``send`` returns at once. Its repr is redacted."""

    def __init__(self, dispatcher: Dispatcher, ids: list[int], destination: str) -> None:
        self._d = dispatcher
        self.ids = tuple(ids)
        self.destination = destination
        self._callbacks: list[Callable[[Receipt], None]] = []
        self._fired = False

    def __repr__(self) -> str:
        return f"<Receipt {list(self.ids)} {self.status} to {self.destination}>"

    @property
    def status(self) -> str:
        """``"pending"``, ``"sent"`` or ``"failed"`` (failed if any part failed)."""
        rows = self._d.outbox.resolve(self.ids)
        if any(r.state == FAILED for r in rows):
            return "failed"
        if rows and all(r.state == SENT for r in rows):
            return "sent"
        return "pending"

    def done(self) -> bool:
        return self.status != "pending"

    @property
    def error(self) -> str | None:
        """The one-line reason when delivery failed, else the last transient error, else None."""
        for r in self._d.outbox.resolve(self.ids):
            if r.error:
                return r.error
        return None

    def results(self) -> list[Delivered]:
        return [Delivered(r.name, r.thread_name) for r in self._d.outbox.resolve(self.ids)]

    def wait(self, timeout: float | None = 30.0) -> Delivered:
        """Block until delivered and return the message's ``name`` and ``thread.name``.

        Raises :class:`DeliveryFailed` when the space refused it and
        :class:`DeliveryTimeout` when it is still queued after ``timeout`` seconds
        (it stays queued and will still be delivered).
        """
        if not self._d.wait_for(list(self.ids), timeout):
            last = self.error
            more = f"; last error: {last}" if last else ""
            raise DeliveryTimeout(f"not delivered within {timeout:g} s (still queued, will retry){more}")
        rows = self._d.outbox.resolve(self.ids)
        for r in rows:
            if r.state == FAILED:
                self.mark_reported()
                raise DeliveryFailed(r.error or "delivery failed", code=r.error_code or 0, status=r.error_status or "")
        return Delivered(rows[0].name, rows[0].thread_name)

    def mark_reported(self) -> None:
        """The caller has told the user about this message's failure: the exit summary skips it."""
        self._d.reported.update(self.ids)

    def add_done_callback(self, fn: Callable[[Receipt], None]) -> None:
        """Call ``fn(receipt)`` from the delivery thread once this is sent or failed."""
        self._callbacks.append(fn)
        if self.done():
            self._fire()
        else:
            self._d.watch(self)

    def _fire(self) -> None:
        if self._fired:
            return
        self._fired = True
        for fn in self._callbacks:
            try:
                fn(self)
            except Exception as e:
                log.warning("chat_magic: receipt callback failed: %s", redact(e))


# -- the process-wide dispatchers, one per outbox folder ------------------------

_dispatchers: dict[str, Dispatcher] = {}
_dlock = threading.Lock()


def dispatcher() -> Dispatcher:
    """The dispatcher of this host's outbox in the current ``CHAT_MAGIC_HOME`` (made on first use)."""
    home = config.home()
    path = str(hosts.outbox_path(home))
    d = _dispatchers.get(path)
    if d is not None:
        return d
    with _dlock:
        d = _dispatchers.get(path)
        if d is None:
            if not _dispatchers:
                atexit.register(_at_exit)
            d = _dispatchers[path] = _open_dispatcher(path)
            _drain_legacy(home)
    return d


def _open_dispatcher(path: str | os.PathLike[str]) -> Dispatcher:
    """A dispatcher for the outbox file ``path``, paced through Redis when one is configured."""
    d = Dispatcher(Outbox(path))
    d.outbox.cluster = pacing.cluster_slot()
    return d


def _drain_legacy(home: os.PathLike[str]) -> None:
    """Deliver what waits in the old single ``outbox.sqlite3`` (before per-host files); nothing new goes there."""
    old = hosts.legacy_to_drain(home)
    if old is not None and str(old) not in _dispatchers:
        _dispatchers[str(old)] = _open_dispatcher(old)
        _dispatchers[str(old)].ensure_running()


_inherited: list[Dispatcher] = []


def _after_fork_in_child() -> None:
    """A forked child (a data-loader worker, multiprocessing) starts afresh on first use.

    SQLite connections and the worker thread do not survive a fork; the
    parent's objects are kept (not closed) so nothing touches the parent's
    database handles from the child.
    """
    _inherited.extend(_dispatchers.values())
    _dispatchers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def send(
    text: str | None = None,
    *,
    to: str | Webhook | None = None,
    thread_key: str | None = None,
    cards: list[dict[str, Any]] | None = None,
    fallback_text: str | None = None,
    truncate: bool = False,
) -> Receipt:
    payloads = build_payloads(text, cards=cards, thread_key=thread_key, truncate=truncate, fallback_text=fallback_text)
    webhook = config.resolve(to)
    return dispatcher().submit(webhook, payloads)


def _without_secrets(body: str, webhook: Webhook) -> str:
    """A serialized payload with the webhook's own key and token replaced by ``…``.

    A job's output or exception may carry the URL it was given (``env``, a
    failed request's message): posting it would hand the webhook to everyone
    in the space. Values shorter than 8 characters are not real secrets and
    are left alone, so a test key such as ``k`` does not mangle the text.
    Key and token are URL-safe, so JSON never escapes them: replacing them in
    the serialized body is exact.
    """
    from urllib.parse import quote

    from .webhook import REDACTED

    for s in sorted({v for s in (webhook.key, webhook.token) for v in (s, quote(s, safe="")) if len(v) >= 8}, key=len, reverse=True):
        if s in body:
            body = body.replace(s, REDACTED)
    return body


def flush(timeout: float | None = 30.0) -> bool:
    return dispatcher().flush(timeout)


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

    Says in one line on stderr what was not delivered, unless the caller was told already.
    """
    import sys

    deadline = time.monotonic() + max(0.0, settings.exit_timeout)
    for d in list(_dispatchers.values()):
        try:
            mine = [i for i in d.outbox.unfinished_ids() if i in d.mine]
            left = deadline - time.monotonic()
            if mine and left > 0:
                d.wait_for(mine, left)
            d.stop(0.5)
            untold = sorted(d.mine - d.reported)
            rows = d.outbox.resolve(untold) if untold else []
            failed = [r for r in rows if r.state == FAILED]
            waiting = [r for r in rows if r.state not in (SENT, FAILED)]
            if failed:
                print(f"chat_magic: {len(failed)} message(s) not delivered: {failed[0].error} (see: chat-magic outbox list)", file=sys.stderr)
            if waiting and d.outbox.problem:  # a temporary outbox: say where it is
                home = d.outbox.path.parent
                print(f"chat_magic: {len(waiting)} message(s) still queued in the temporary outbox {d.outbox.path}; "
                      f"deliver them with: CHAT_MAGIC_HOME={home} chat-magic outbox flush", file=sys.stderr)
            elif waiting:
                print(f"chat_magic: {len(waiting)} message(s) still queued; the next chat_magic process or `chat-magic outbox flush` delivers them", file=sys.stderr)
        except Exception:
            pass
