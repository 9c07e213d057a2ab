"""Pacing slots: one request per interval per space, for one host or a whole cluster.

Google Chat counts a webhook's quota per space: about one write per second,
shared by everything that posts there. Two slots pace the requests:

- **The local slot** (always, :class:`SqlitePacer`): the ``pacing`` table in
  the host's outbox file, taken in the same SQLite transaction as the claim
  (``Outbox.claim_local``), so every process of one host shares it.
- **The cluster slot** (opt-in, :class:`RedisSlot`): one Redis key per space,
  taken before the claim, so every process on every host shares it. The local
  slot stays in force underneath, and is what a host falls back to alone when
  Redis does not answer.

Why redis-py with two short Lua scripts, and not a limiter library such as
``limits``: the slot must (1) let one request through per interval for the
whole cluster, (2) be *held* longer on demand, a 429's ``Retry-After`` or the
gap after a slow answer, for everyone, and (3) take its time from the Redis
server, never from hosts' clocks. ``limits`` counts hits in windows and has no
"hold this key until" operation, and its Redis scripts take the timestamp as
an argument from the client's ``time.time()``. Here the slot is a key that
*exists while the space is closed*: ``SET key token NX PX interval`` opens a
window for one request, and the key's expiry, kept by the Redis server, says
when the next one may go. Holds only ever lengthen the key's time to live.
Hosts send durations, never timestamps, so their clocks need not agree.

Redis holds no message: durability stays in each host's outbox. When Redis
does not answer, the host paces itself (one line on stderr per outage) and
asks Redis again every :data:`RETRY_EVERY` seconds, without a line when it
is back: nothing is lost or sent twice either way, since claims, leases and
``requestId``\\ s live in the outbox.

Both are handed to the outbox, which asks them and claims by itself: no
pacer calls the outbox, and this module imports nothing of it (the table
the local slot is kept in is a :class:`SlotTable`, which ``outbox.py`` provides,
with the SQL).

Round trips are what a distant Redis costs, so a claim across any number of
busy spaces is *one* round trip (one script tries each space's slot in
order and takes the first open one), and so is asking how long each space
must wait (one pipeline). A Redis that answers, but slowly (round trips
over :data:`SLOW_AFTER` seconds, or ``CHAT_MAGIC_REDIS_SLOW``, several in a
row), is treated like one that is down: local pacing, one line, asked again
later.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import config
from .console import say as _console_say

__all__ = ["RedisSlot", "SlotTable", "SqlitePacer", "after_fork_in_child", "cluster_slot", "redact_url", "reset", "scrub"]

log = logging.getLogger("chat_magic")

KEY_PREFIX = "chat_magic:slot:"
SOCKET_TIMEOUT = 0.5  # a Redis that takes longer is treated as down: the host paces itself
RETRY_EVERY = 2.0  # seconds between two attempts to reach a Redis that did not answer
SLOW_AFTER = 0.15  # seconds: a call slower than this, SLOW_STREAK times in a row, makes the host pace alone
SLOW_STREAK = 3
ENV_SLOW = "CHAT_MAGIC_REDIS_SLOW"
INSTALL_HINT = 'pip install "chat-magic[redis]"'
ALONE = "pacing each host alone meanwhile"

# KEYS[1] slot key; ARGV[1] token, ARGV[2] interval in ms.
# 0: this caller holds the slot now; else milliseconds until the key expires.
_TAKE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]); ttl = tonumber(ARGV[2]) end
if ttl < 1 then ttl = 1 end
return ttl
"""
# KEYS: the slot keys of the spaces that may go now, oldest head first; ARGV[1] token, ARGV[2] interval in ms.
# Takes the first open slot: its 1-based index, else 0. One round trip however many spaces are busy.
_TAKE_FIRST = """
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then return i end
  if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, ARGV[2]) end
end
return 0
"""
# KEYS[1] slot key; ARGV[1] hold in ms. Lengthens the key's life to ARGV[1], never shortens it.
_HOLD = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], 'hold', 'PX', ARGV[1]) end
return ttl
"""
# KEYS[1] slot key; ARGV[1] token: frees a slot taken but not used (nothing was claimed).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_USERINFO = re.compile(r"(?<=//).*@(?=[^@]*$)")  # up to the last @: a password may hold /, @ or spaces
_PASSWORD_PARAM = re.compile(r"(?i)(password=)[^&#\s]*")


def redact_url(url: object) -> str:
    """A Redis URL with its user and password (``redis://user:secret@``, ``?password=``) replaced by ``…``."""
    s = _USERINFO.sub("…@", str(url), count=1)
    return _PASSWORD_PARAM.sub(r"\1…", s)


def scrub(text: str, url: str) -> str:
    """``text`` (an error message) without the password of ``url`` anywhere in it, one line, bounded."""
    from urllib.parse import unquote, urlsplit

    text = redact_url(text)
    try:
        secret = urlsplit(url).password
    except ValueError:
        secret = None
    for s in {secret, unquote(secret) if secret else None}:
        if s and len(s) >= 3:
            text = text.replace(s, "…")
    return " ".join(text.split())[:300]


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisSlot:
    """The cluster-wide pacing slot of every space, kept in one Redis.

    Thread-safe, never raises into delivery: a Redis error makes the host pace
    itself until Redis answers again. The client is made on first use, in the
    delivery worker: importing redis-py costs a caller's ``send()`` nothing.
    """

    def __init__(self, url: str, *, say: Callable[[str], None] | None = None) -> None:
        self.url = url
        self.shown = redact_url(url)
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._broken = False  # the client cannot be made (no redis package, a URL redis-py refuses): local pacing for good
        self._say = say or _stderr_line
        self._lock = threading.Lock()
        self._local = threading.local()  # the token of the slot this thread took last, per space
        self._down = False
        self._retry_at = 0.0
        self.outages = 0
        self.slow_after = _slow_after(self._say)
        self._slow_streak = 0  # calls in a row slower than slow_after

    def __repr__(self) -> str:
        return f"<RedisSlot {self.shown} {'down' if self._down else 'up'}>"

    @property
    def up(self) -> bool:
        """Whether the last request to Redis was answered (and a client could be made)."""
        return not self._down and not self._broken

    # -- the three operations ----------------------------------------------------

    def remaining(self, space_key: str) -> float | None:
        """Seconds until the space's slot opens for the cluster (0: open); None when Redis cannot be asked."""
        ttl = self._call(lambda c: c.pttl(_key(space_key)))
        if ttl is None:
            return None
        return max(0.0, int(ttl) / 1000.0)

    def take(self, space_key: str, interval: float) -> float | None:
        """Take the space's slot for one request: 0.0 when taken, else seconds until it may open.

        None when Redis cannot be asked (pace locally).
        """
        token = f"{os.getpid()}:{threading.get_ident()}:{time.monotonic_ns()}"
        wait = self._call(lambda c: self._scripts["take"](keys=[_key(space_key)], args=[token, _ms(interval)]))
        if wait is None:
            return None
        if int(wait) == 0:
            self._tokens()[space_key] = token
            return 0.0
        return int(wait) / 1000.0

    def take_first(self, space_keys: list[str], interval: float) -> int | None:
        """Take the first open slot among ``space_keys`` in one round trip: its index, -1 if none is open.

        None when Redis cannot be asked (pace locally).
        """
        token = f"{os.getpid()}:{threading.get_ident()}:{time.monotonic_ns()}"
        got = self._call(lambda c: self._scripts["take_first"](keys=[_key(k) for k in space_keys], args=[token, _ms(interval)]))
        if got is None:
            return None
        if int(got) == 0:
            return -1
        self._tokens()[space_keys[int(got) - 1]] = token
        return int(got) - 1

    def release(self, space_key: str) -> None:
        """Free the slot this thread took for ``space_key`` but did not use."""
        token = self._tokens().pop(space_key, None)
        if token is not None:
            self._call(lambda c: self._scripts["release"](keys=[_key(space_key)], args=[token]))

    def hold(self, space_key: str, seconds: float) -> None:
        """Keep the space closed for everyone for ``seconds`` more (never opens it earlier)."""
        if seconds > 0:
            self._call(lambda c: self._scripts["hold"](keys=[_key(space_key)], args=[_ms(seconds)]))

    # -- what the outbox asks ----------------------------------------------------

    def waits(self, local: dict[str, float]) -> dict[str, float]:
        """Each space's local wait, raised to the cluster's: a space is ready when both slots are open.

        One round trip (a pipeline) for every space that is open locally.
        """
        open_here = [space for space, wait in local.items() if wait <= 0]
        if not open_here:
            return local
        ttls = self._call(lambda c: _pttls(c, open_here))
        if ttls is None:
            return local
        out = dict(local)
        out.update({space: max(0.0, int(ttl) / 1000.0) for space, ttl in zip(open_here, ttls)})
        return out

    # -- availability ------------------------------------------------------------

    def _tokens(self) -> dict[str, str]:
        tokens = getattr(self._local, "tokens", None)
        if tokens is None:
            tokens = self._local.tokens = {}
        return tokens

    def _connection(self) -> Any:
        """The redis-py client, made on first use; None when it cannot be made (said once)."""
        if self._client is not None or self._broken:
            return self._client
        with self._lock:
            if self._client is None and not self._broken:
                try:
                    self._client = _client(self.url)
                except ImportError:
                    self._broken = True
                    self._say(f"chat_magic: {_where()} is set but the redis package is missing: {INSTALL_HINT}; {ALONE}")
                except Exception as e:  # ValueError: a bad db number, an unknown option
                    self._broken = True
                    self._say(f"chat_magic: {_where()} {self.shown!r} is not a valid Redis URL ({self._scrub(str(e))}); {ALONE}")
                else:
                    self._scripts = {name: self._client.register_script(lua) for name, lua in
                                     (("take", _TAKE), ("take_first", _TAKE_FIRST), ("hold", _HOLD), ("release", _RELEASE))}
        return self._client

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        """Run one Redis command; None (and local pacing for a while) when Redis does not answer."""
        if self._down and time.monotonic() < self._retry_at:
            return None
        client = self._connection()
        if client is None:
            return None
        started = time.monotonic()
        try:
            try:
                result = fn(client)
            except Exception as e:
                if self._down or not _dropped(e):
                    raise
                started = time.monotonic()
                result = fn(client)  # a connection Redis dropped (a restart): once more, on a fresh one
        except Exception as e:  # redis.RedisError, OSError, a script error: never into delivery
            self._failed(e)
            return None
        if time.monotonic() - started > self.slow_after:
            self._slow(time.monotonic() - started)
            return result  # it did answer: this answer stands, the next calls pace locally
        self._slow_streak = 0
        if self._down:
            with self._lock:
                if self._down:
                    self._down = False
                    log.info("chat_magic: Redis at %s answers again: pacing shared by every host", self.shown)
        return result

    def _failed(self, e: BaseException) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + RETRY_EVERY
            if self._down:
                return
            self._down = True
            self.outages += 1
        reason = self._scrub(str(e) or type(e).__name__)
        self._say(f"chat_magic: Redis at {self.shown} does not answer ({reason}); pacing this host alone until it does "
                  f"(messages stay in this host's outbox)")

    def _slow(self, seconds: float) -> None:
        """A slow answer: after :data:`SLOW_STREAK` in a row, pace locally as if Redis were down (one line)."""
        with self._lock:
            self._slow_streak += 1
            if not self._down and self._slow_streak < SLOW_STREAK:
                return
            self._retry_at = time.monotonic() + RETRY_EVERY
            if self._down:
                return
            self._down = True
            self.outages += 1
        self._say(f"chat_magic: Redis at {self.shown} answers slowly ({seconds * 1000:.0f} ms a call, over "
                  f"{self.slow_after * 1000:.0f} ms); pacing this host alone until it is quick again "
                  f"(set {ENV_SLOW} to change the limit)")

    def _scrub(self, text: str) -> str:
        return scrub(text, self.url)

    def close(self) -> None:
        try:
            if self._client is not None:
                self._client.close()
        except Exception:
            pass


def _pttls(client: Any, space_keys: list[str]) -> list[int]:
    """Each space's slot time to live in ms (<= 0: open), in one pipelined round trip."""
    pipe = client.pipeline(transaction=False)
    for space in space_keys:
        pipe.pttl(_key(space))
    return [int(t) for t in pipe.execute()]


def _slow_after(say: Callable[[str], None]) -> float:
    """``CHAT_MAGIC_REDIS_SLOW`` (a duration over 0, at most 60 s) or :data:`SLOW_AFTER`; a bad value is one line and the default."""
    from .rules import env_seconds

    return env_seconds(ENV_SLOW, SLOW_AFTER, least=0.0, above=True, most=60.0, say=say)


def _dropped(e: BaseException) -> bool:
    """A lost connection (worth one immediate retry), not a timeout or an error reply."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    return isinstance(e, RedisConnectionError)


def _key(space_key: str) -> str:
    return KEY_PREFIX + space_key


def _stderr_line(line: str) -> None:
    """The default ``say``: ``chat_magic: ...`` lines through :func:`chat_magic.console.say` (it redacts)."""
    prefix, _, rest = line.partition(": ")
    _console_say(rest, prefix=prefix) if rest else _console_say(line)


# -- the local slot, in the host's outbox file ----------------------------------------

class SlotTable(Protocol):
    """Where the local slots are kept: the outbox file's ``pacing`` table, in the caller's transaction.

    ``chat_magic.outbox.PacingTable`` is the one (the outbox keeps every SQL statement).
    """

    def slot(self, space_key: str) -> float | None: ...

    def set_slot(self, space_key: str, until: float) -> None: ...

    def extend_slot(self, space_key: str, until: float) -> None: ...


class SqlitePacer:
    """Each space's pacing slot, kept in the outbox file: shared by every process on this machine.

    The one place that decides when a space may be posted to again.
    :meth:`Outbox.claim_local` asks :meth:`free_at` and calls :meth:`take` in
    the claim's own transaction; the outcome of a request calls :meth:`hold`.
    """

    def free_at(self, table: SlotTable, space_key: str) -> float:
        """When the space may be posted to (a wall-clock time; 0.0: never taken, open)."""
        until = table.slot(space_key)
        return 0.0 if until is None else until

    def take(self, table: SlotTable, space_key: str, until: float) -> None:
        """A request goes now: the next may go at ``until``."""
        table.set_slot(space_key, until)

    def hold(self, table: SlotTable, space_key: str, until: float) -> None:
        """Keep the slot closed until ``until`` (never opens it earlier; 0: nothing to hold)."""
        if until:
            table.extend_slot(space_key, until)


# -- the process's cluster slot, made from the configured URL ----------------------

_slots: dict[str, RedisSlot | None] = {}
_slots_lock = threading.Lock()  # guards _slots (one RedisSlot per URL); taken after delivery's _dlock, never before


def cluster_slot() -> RedisSlot | None:
    """The Redis slot configured by ``CHAT_MAGIC_REDIS_URL`` or ``redis_url``, or None (pace per host).

    A URL that is not a Redis URL, or a missing ``redis`` package, is one line
    on stderr (once per process and URL) and local pacing: a typo in the
    cluster's settings must not cost a message.
    """
    url = config.redis_url()
    if not url:
        return None
    with _slots_lock:
        if url not in _slots:
            _slots[url] = _connect(url)
        return _slots[url]


def _connect(url: str, say: Callable[[str], None] = _stderr_line) -> RedisSlot | None:
    """A slot for ``url``, or None (one line said) when it cannot be a Redis URL. Imports nothing."""
    from urllib.parse import urlsplit

    if not re.match(r"(?i)^(redis|rediss|unix)://", url):
        say(f"chat_magic: {_where()} {redact_url(url)!r} is not a Redis URL: use redis://[:password@]host:6379/0; {ALONE}")
        return None
    try:
        urlsplit(url).port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        say(f"chat_magic: {_where()} {redact_url(url)!r} is not a valid Redis URL ({scrub(str(e), url)}); {ALONE}")
        return None
    return RedisSlot(url, say=say)


def _where() -> str:
    """Where the Redis URL came from, for a message."""
    if os.environ.get(config.ENV_REDIS, "").strip():
        return config.ENV_REDIS
    return f"redis_url in {config.config_path()}"


def _client(url: str) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 0),  # one try: a Redis that does not answer means local pacing now
        health_check_interval=0,
    )


def after_fork_in_child() -> None:
    """A forked child makes its own Redis clients (a connection is not shared with the parent) under a fresh lock."""
    global _slots_lock
    _slots.clear()
    _slots_lock = threading.Lock()


def reset() -> None:
    """Forget the process's Redis clients (tests; a changed URL)."""
    with _slots_lock:
        slots = [s for s in _slots.values() if s is not None]
        _slots.clear()
    for s in slots:
        s.close()
