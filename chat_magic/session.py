"""One thread per notebook session (or per script run).

Every message a kernel (or a script) posts shares one ``threadKey``, made of
the notebook's name where the frontend exposes it, the start time and a
random part. The first message into each space's thread says where it comes
from: notebook or script, host and user.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_THREAD_KEY = "CHAT_MAGIC_THREAD_KEY"


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s[:limit] or "session"


ENV_SOURCE = "CHAT_MAGIC_SOURCE"


def detect_source(user_ns: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(kind, name): ``("notebook", "train.ipynb")``, ``("script", "train.py")`` or ``("ipython", "IPython")``.

    First match wins:

    1. ``CHAT_MAGIC_SOURCE`` (set it where nothing below can know the name);
    2. VS Code's ``__vsc_ipynb_file__``, IPython's ``__session__``, Jupyter
       Server's ``JPY_SESSION_NAME`` (JupyterLab, Notebook 7, ``chat-magic demo``);
    3. a hosted notebook that hides the file name: ``Colab``, ``Kaggle``, ``Databricks``;
    4. in a kernel, the ``.ipynb`` on the command line of the process that started
       it: ``papermill in.ipynb out.ipynb``, ``jupyter nbconvert --execute``,
       ``jupyter execute``;
    5. ``IPython`` in a shell, else ``sys.argv[0]``.
    """
    ns = user_ns or {}
    in_shell = user_ns is not None or ("IPython" in sys.modules and _in_ipython())
    named = os.environ.get(ENV_SOURCE, "").strip()
    if named:
        return ("notebook" if in_shell or named.endswith(".ipynb") else "script"), Path(named).name or named
    for candidate in (ns.get("__vsc_ipynb_file__"), ns.get("__session__"), os.environ.get("JPY_SESSION_NAME")):
        if isinstance(candidate, str) and candidate.strip():
            name = Path(candidate).name
            if name.endswith(".ipynb") or "ipynb" in name:
                return "notebook", name
    from .config import hosted_service

    host = hosted_service()
    if host:
        return "notebook", host
    launcher = _launcher_notebook() if "ipykernel" in sys.modules else None
    if launcher:
        return "notebook", launcher
    if in_shell:
        return "ipython", "IPython"
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if argv0 and argv0 not in ("-c", "-m"):
        return "script", Path(argv0).name
    return "python", "python"


def _launcher_notebook() -> str:
    """The first ``.ipynb`` on the parent process's command line (papermill, nbconvert, jupyter execute), or ``""``."""
    args: list[str] = []
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            args = [a.decode("utf-8", "replace") for a in f.read().split(b"\0")]
    except OSError:  # no /proc (macOS, Windows): psutil when it is there
        try:
            import psutil

            args = list(psutil.Process(os.getppid()).cmdline())
        except Exception:
            return ""
    return next((Path(a).name for a in args if a.endswith(".ipynb")), "")


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


class Session:
    """The thread this process (notebook kernel or script) posts into."""

    def __init__(self, user_ns: Mapping[str, Any] | None = None, *, thread_key: str | None = None) -> None:
        self.kind, self.source = detect_source(user_ns)
        self.host = socket.gethostname()
        try:
            self.user = getpass.getuser()
        except Exception:
            self.user = "unknown"
        self.started = time.time()
        self._fixed_key = thread_key or os.environ.get(ENV_THREAD_KEY) or None
        self.thread_key = self._fixed_key or self._make_key()
        self._announced: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.announce = True  # False: notices that say where they come from themselves need no header

    def _make_key(self) -> str:
        from .jobs import identity, thread_key

        job = identity()
        if job:  # every rank of a distributed job derives the same key: one thread per job
            return thread_key(job)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(self.started))
        return f"chat-magic-{_slug(self.source)}-{stamp}-{secrets.token_hex(3)}"

    def rename(self, name: str) -> None:
        """Name the notebook (``%chat_thread --name``) where :func:`detect_source` cannot.

        Before the first message the thread key takes the new name too.
        """
        name = " ".join(str(name).split())[:200]
        if not name:
            from .errors import ConfigError

            raise ConfigError("the name is empty: write %chat_thread --name my-notebook.ipynb")
        with self._lock:
            self.kind, self.source = "notebook", name
            if not self._announced and not self._fixed_key:
                self.thread_key = self._make_key()

    def new_thread(self, thread_key: str | None = None) -> str:
        """Start a fresh thread (a new key, announced again) and return its key."""
        with self._lock:
            self.started = time.time()
            self.thread_key = thread_key or self._make_key()
            self._announced.clear()
        return self.thread_key

    @property
    def origin(self) -> str:
        """Where messages come from, e.g. ``train.ipynb on gpu-01 (alice)``."""
        return f"{self.source} on {self.host} ({self.user})"

    def header(self) -> str:
        from .message import neutralize

        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started))
        icon = {"notebook": "📓", "script": "📜"}.get(self.kind, "🐍")
        return f"{icon} *{neutralize(self.source)}* on {neutralize(self.host)} ({neutralize(self.user)}), session started {when}"

    def send(self, text: str | None = None, *, to: Any = None, thread_key: str | None = None, **kwargs: Any):
        """``chat_magic.send`` into this session's thread, announcing the session first.

        The announcement (the first message into each space's thread) and the
        message are built first and queued in one transaction: both or
        neither, so a message that cannot be sent leaves no orphan header.
        ``thread_key`` overrides the session's key for this one message (no
        announcement).
        """
        from . import config
        from .delivery import send

        webhook = config.resolve(to)
        key = thread_key or self.thread_key
        with self._lock:
            announce = self.announce and thread_key is None and (webhook.space_key, key) not in self._announced
            self._announced.add((webhook.space_key, key))
        try:
            return send(text, to=webhook, thread_key=key, header=self.header() if announce else None, **kwargs)
        except Exception:
            if announce:
                with self._lock:
                    self._announced.discard((webhook.space_key, key))
            raise


_current: Session | None = None
_clock = threading.Lock()


def current_session(user_ns: Mapping[str, Any] | None = None) -> Session:
    """The process's session, made on first use."""
    global _current
    if _current is None:
        with _clock:
            if _current is None:
                _current = Session(user_ns)
    return _current


def set_session(session: Session | None) -> None:
    global _current
    _current = session
