"""Shared fixtures: a real emulator over real HTTP on loopback, a private outbox per test.

How the suite runs (README, "Run the tests"):
- ``python -m pytest`` runs everything not marked ``slow`` (about 2 minutes on 2 cores);
  ``python -m pytest -m slow`` runs the rest; ``.ci/run`` runs both, so every test runs once.
- Markers: ``slow`` (clusters and ``unshare``, the real quota over long runs, the training
  frameworks, the browser, long sweeps: anything over a few seconds), ``browser`` (also
  ``slow``), ``pacing`` (the test is about the 1 request/s quota, below), ``jupyter`` (set
  here by module: CI runs these again on Colab's pinned stack).
- Pacing-free by default: a test not marked ``pacing`` gets the ``emulator`` without its
  quota and this process's delivery ``interval`` and ``gap_after_answer`` at
  :data:`TEST_INTERVAL`, so no test waits a second per message for nothing. A test about
  pacing says so: ``@pytest.mark.pacing`` (or the ``paced_space`` fixture) gives the real
  quota (1 request/s per space) and the user's interval (1.1 s). The interval reaches this
  process and the subprocesses and kernels a test starts through ``CHAT_MAGIC_INTERVAL``
  (set for the session, removed in a ``pacing`` test), so children are pacing-free too.
- In parallel: ``python -m pytest`` runs on 4 pytest-xdist workers, a file on one (pyproject's addopts), each
  with its own emulators, temporary folders and ``IPYTHONDIR``; a test keeps to its own
  ports (ask the OS for a free one), folders (``tmp_path``) and environment (``monkeypatch``).
- Isolation: the whole session (this process, the kernels and subprocesses it starts, which
  inherit the environment) has its IPython history in a temporary ``IPYTHONDIR`` and its
  temporary folders under a private ``TMPDIR``; both are deleted at the end. Nothing is
  written to ``~/.ipython`` and no ``/tmp/chat_magic-*`` is left behind
  (``test_isolation.py`` checks it).
- A fast test: ``fast_backoff`` for fault tests (retries within a second); every wait polls
  a condition (:func:`wait_until`, ``space.wait_for``, ``Receipt.wait``) with a generous
  deadline; never a fixed sleep as proof that something happened or did not; no assertion
  on the order or the size of timings.

Fixtures:
- ``emulator``: one :class:`chat_magic.emulator.Emulator` for the whole run
  (strict proto validation; its 1 request/second quota only for ``pacing`` tests).
- ``space``: a fresh space on that emulator for one test, with the
  environment pointing ``GOOGLE_CHAT_WEBHOOK_URL`` at it and ``CHAT_MAGIC_HOME``
  at a private folder; ``space.messages()`` is what the space received.
- ``paced_space``: ``space`` for a test about pacing (the same as ``space`` + ``pacing``).
- ``fast_space``: the same on a second emulator that never has a quota, and this
  process's pacing off (kept for the tests written before pacing-free was the default).
- ``outbox_home``, ``shell``/``ip`` (a real IPython shell, chat_magic loaded),
  ``fast_backoff``, ``debug_logs``, ``replies`` (a scripted loopback server, ``tests/replies.py``).
- ``validate_message(payload)``: checks a payload with the official proto.
- ``wait_until(predicate)``: poll until true, or fail saying what was awaited.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chat_magic.emulator import Emulator

# -- isolation, set before any test module is imported (some create an IPython shell at once):
# IPython's history and every temporary folder of this session, its kernels and its subprocesses
# go into one private folder, deleted at the end. pytest's own tmp_path stays where it was (kept
# for a look after a failure, as pytest keeps it).
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
# in the first temporary folder, also in a pytest-xdist worker (whose TMPDIR is the controller's private one):
# a deeper path is too long for the Unix sockets of Ray and Jupyter (107 bytes at most)
SESSION_DIR = Path(tempfile.mkdtemp(prefix="cm-pytest-", dir=os.environ["PYTEST_DEBUG_TEMPROOT"]))
(SESSION_DIR / "ipython").mkdir()
(SESSION_DIR / "tmp").mkdir()
os.environ["IPYTHONDIR"] = str(SESSION_DIR / "ipython")
os.environ["TMPDIR"] = str(SESSION_DIR / "tmp")
tempfile.tempdir = None  # gettempdir() reads TMPDIR again
# deleted at exit, after IPython's own exit handler has closed its history (atexit runs the last registered first)
atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)

# tqdm.auto decides once, at its import, between the console and the notebook bar, by whether
# ipykernel.zmqshell is imported: this process is no kernel, but kernel tests import ipykernel and
# chat_magic.session may then import ipykernel.connect (which imports zmqshell). Decided here, first.
try:
    import tqdm.auto  # noqa: F401
except ImportError:
    pass

# A suite started in the background by a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored, and
# every process it starts would too: the real Ctrl-C the interrupt tests send their scripts (os.kill SIGINT) would
# then do nothing, and those tests fail, or pass having proved nothing. A user's program run from a terminal has
# the default; so do this process's children (a handler becomes the default across exec, an ignore does not).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TEST_INTERVAL = 0.01  # this process's pacing interval in tests not marked `pacing` (the user's: 1.1 s)
# ... and that of the kernels and subprocesses they start, which inherit the environment (a `pacing` test removes it)
os.environ["CHAT_MAGIC_INTERVAL"] = str(TEST_INTERVAL)

KEY = "emu-key-" + "k" * 24  # long enough that a leak is unmistakable
TOKEN = "emu-token-" + "t" * 24


def validate_message(payload: dict | str) -> None:
    """Raise unless ``payload`` is a valid google.chat.v1 Message (unknown fields rejected)."""
    from google.apps.chat_v1.types import Message

    s = payload if isinstance(payload, str) else json.dumps(payload)
    Message.from_json(s, ignore_unknown_fields=False)


def assert_no_secret(*texts: object) -> None:
    for t in texts:
        s = str(t)
        assert KEY not in s and TOKEN not in s, f"secret leaked in: {s[:300]}"


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, *, what: str = "the condition", interval: float = 0.05) -> Any:
    """Call ``predicate`` until it returns something true, and return that; fail after ``timeout`` seconds.

    Waits on an event; never use a fixed sleep as proof that something did not happen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def committed_clean(path) -> tuple[str, list]:
    """A notebook as committed: valid, with code cells and no outputs nor execution counts.

    Returns its raw text and its code cells, for the checks each notebook adds.
    """
    import nbformat

    raw = path.read_text(encoding="utf-8")
    nb = nbformat.reads(raw, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has code"
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path.name} is committed with outputs"
    return raw, code


class Space:
    def __init__(self, emu: Emulator, name: str) -> None:
        self.emu = emu
        self.name = name
        self.url = emu.webhook_url(space=name, key=KEY, token=TOKEN)

    def messages(self) -> list[dict]:
        return self.emu.messages(space=self.name)

    def wait_for(self, n: int, timeout: float = 20.0) -> list[dict]:
        return self.emu.wait_for(n, timeout=timeout, space=self.name)

    def requests(self) -> list[dict]:
        return [r for r in self.emu.requests if f"/spaces/{self.name}/" in r["path"]]

    def texts(self) -> list[str]:
        return [m.get("text", "") for m in self.messages()]


@pytest.fixture(scope="session")
def emulator():
    """The session's emulator; its 1 request/s quota holds in tests marked ``pacing`` only (see ``_pacing``)."""
    emu = Emulator(key=KEY, token=TOKEN, qps=1.0, strict=True)
    emu.start()
    yield emu
    emu.stop()


def _about_pacing(request) -> bool:
    return request.node.get_closest_marker("pacing") is not None or "paced_space" in request.fixturenames


@pytest.fixture(autouse=True)
def _pacing(request, monkeypatch):
    """Pacing-free unless the test is about pacing: no quota in ``emulator``, a tiny interval here and in children.

    The interval comes from ``CHAT_MAGIC_INTERVAL`` (set above for the whole session, so the
    kernels and subprocesses a test starts are pacing-free too). A test marked ``pacing`` (or
    using ``paced_space``) runs without it: the real quota and the user's settings, here and in
    its children. Either way this process's settings are as before afterwards.
    """
    from chat_magic import delivery

    saved = dict(vars(delivery.settings))
    if _about_pacing(request):
        monkeypatch.delenv("CHAT_MAGIC_INTERVAL", raising=False)
        try:
            yield
        finally:
            vars(delivery.settings).update(saved)
        return
    emu = request.getfixturevalue("emulator") if "emulator" in request.fixturenames else None
    if emu is not None:
        emu.qps = None
    try:
        yield
    finally:
        vars(delivery.settings).update(saved)
        if emu is not None:
            emu.qps = 1.0


@pytest.fixture
def outbox_home(tmp_path, monkeypatch):
    home = tmp_path / "chat_magic_home"
    monkeypatch.setenv("CHAT_MAGIC_HOME", str(home))
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("GOOGLE_CHAT_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("CHAT_MAGIC_THREAD_KEY", raising=False)
    monkeypatch.delenv("CHAT_MAGIC_REDIS_URL", raising=False)
    yield home
    from chat_magic import delivery, pacing, session

    delivery.shutdown()
    pacing.reset()
    session.set_session(None)


@pytest.fixture(scope="session")
def shell():
    """A real IPython InteractiveShell (history in memory), shared by the tests of magics."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    if InteractiveShell.initialized():
        return InteractiveShell.instance()
    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    return InteractiveShell.instance(config=cfg)


@pytest.fixture
def ip(shell, outbox_home):
    """The shell with chat_magic loaded, and unloaded afterwards with its settings back to defaults."""
    shell.config.pop("ChatMagics", None)
    shell.run_cell("%load_ext chat_magic")
    assert shell.magics_manager.registry.get("ChatMagics") is not None
    yield shell
    shell.run_cell("%unload_ext chat_magic")
    shell.config.pop("ChatMagics", None)


@pytest.fixture(scope="session")
def fast_emulator():
    """An emulator with no quota: for tests that are not about pacing."""
    emu = Emulator(key=KEY, token=TOKEN, qps=None, strict=True)
    emu.start()
    yield emu
    emu.stop()


def _space(emu: Emulator, monkeypatch):
    sp = Space(emu, "S" + uuid.uuid4().hex[:12].upper())
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", sp.url)
    yield sp
    # every payload a test made the space accept is a valid Message
    for r in sp.requests():
        if r.get("status") == 200 and r.get("body"):
            validate_message(r["body"])


@pytest.fixture
def space(emulator, outbox_home, monkeypatch):
    """A fresh space; pacing-free unless the test is marked ``pacing`` (then the real 1 request/s quota)."""
    yield from _space(emulator, monkeypatch)


@pytest.fixture
def paced_space(emulator, outbox_home, monkeypatch):
    """A fresh space under the real quota (1 request/s), with this process pacing as it does for users."""
    yield from _space(emulator, monkeypatch)


@pytest.fixture
def fast_space(fast_emulator, outbox_home, monkeypatch):
    """A fresh space with no quota, and no pacing in this process: what is tested is not the timing."""
    from chat_magic import delivery

    saved = (delivery.settings.interval, delivery.settings.gap_after_answer)
    delivery.settings.interval, delivery.settings.gap_after_answer = 0.0, 0.0
    try:
        yield from _space(fast_emulator, monkeypatch)
    finally:
        delivery.settings.interval, delivery.settings.gap_after_answer = saved


@pytest.fixture
def replies():
    """``replies(script)``: a :class:`replies.Replies` loopback server answering from ``script``; all closed afterwards."""
    from replies import Replies

    made: list[Replies] = []

    def make(script):
        made.append(Replies(script))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def fast_backoff():
    """Retries after 0.1-0.8 s instead of 0.5-15 s: the same behaviour, quicker fault tests."""
    from chat_magic import delivery

    saved = (delivery.settings.backoff_base, delivery.settings.backoff_cap)
    delivery.settings.backoff_base, delivery.settings.backoff_cap = 0.2, 0.8
    yield
    delivery.settings.backoff_base, delivery.settings.backoff_cap = saved


@pytest.fixture
def debug_logs(caplog):
    """Capture chat_magic's log at DEBUG (for secret scans)."""
    caplog.set_level(logging.DEBUG, logger="chat_magic")
    caplog.set_level(logging.DEBUG, logger="urllib3")
    return caplog


# -- the `jupyter` marker: tests that touch IPython, ipykernel, ipywidgets or notebooks. CI runs them a
# second time on Colab's pinned stack (IPython 7.34, ipywidgets 7.7.1, ipykernel 6.17.1): pytest -m jupyter
JUPYTER_MODULES = {"test_magics", "test_composer", "test_quickstart_notebook", "test_training_notebook",
                   "test_hosted", "test_spaces", "test_front_ends", "test_runall",
                   # a real ipykernel killed, restarted, terminated mid-cell; %chat_autonotify --stall-after; %%chat killed
                   "test_watcher", "test_termination", "test_stalls", "test_never_silent_edges"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ in JUPYTER_MODULES:
            item.add_marker(pytest.mark.jupyter)
        if item.get_closest_marker("browser") is not None:
            item.add_marker(pytest.mark.slow)  # the default run leaves the browser out; `-m slow` runs it
