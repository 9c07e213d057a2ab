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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .delivery import Receipt

__all__ = ["Session", "current_session", "detect_source", "set_session"]

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
    5. in a kernel, the notebook a Jupyter server on this machine runs it for,
       from the server's sessions API (classic Notebook 6 and other servers
       that set no ``JPY_SESSION_NAME``): see :func:`_server_notebook`;
    6. ``IPython`` in a shell, else ``sys.argv[0]``.
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
    served = _server_notebook() if _in_kernel() else None
    if served:
        return "notebook", served
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


SERVER_TIMEOUT = 1.0  # seconds for all the servers asked together: a server that does not answer costs no more


def _server_notebook(timeout: float = SERVER_TIMEOUT) -> str:
    """The notebook a running Jupyter server has this kernel open for, or ``""``; never raises.

    As Notebook 6 extensions do: this kernel's id from its connection file
    (``kernel-<id>.json``), the servers from their info files
    (``jpserver-*.json``, ``nbserver-*.json``) in the connection file's folder
    and the Jupyter runtime folder, then each server's ``api/sessions`` with
    its token, for the session whose kernel is this one. Only servers on a
    loopback address are asked, within ``timeout`` seconds in all. The info
    files are read directly: importing ``jupyter_server`` or ``notebook`` to
    list them would cost the kernel seconds (and their listing deletes the
    files of servers it thinks are gone).
    """
    try:
        connection = _connection_file()
        m = re.search(r"kernel-(.+)\.json$", connection)
        if not m:
            return ""
        kernel_id = m.group(1)
        deadline = time.monotonic() + timeout
        for info in _server_infos(Path(connection).parent):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            name = _session_notebook(info, kernel_id, left)
            if name:
                return name
    except Exception:
        pass
    return ""


def _in_kernel() -> bool:
    """True inside a running ipykernel (not merely a process that imported ipykernel)."""
    app = sys.modules.get("ipykernel.kernelapp")
    try:
        return bool(app is not None and app.IPKernelApp.initialized())
    except Exception:
        return False


def _connection_file() -> str:
    """This kernel's connection file, from the running kernel app (else its ``-f`` argument), or ``""``.

    Read from ``IPKernelApp`` without importing ``ipykernel.connect``: that import pulls in
    ``ipykernel.zmqshell``, after which ``tqdm.auto`` picks its notebook bar in a plain process.
    """
    try:
        app = sys.modules["ipykernel.kernelapp"].IPKernelApp.instance()
        return str(Path(app.connection_dir, app.connection_file)) if app.connection_file else ""
    except Exception:
        args = sys.argv
        for i, a in enumerate(args):
            if a == "-f" and i + 1 < len(args):
                return args[i + 1]
            if a.startswith("--f="):
                return a[4:]
    return ""


def _server_infos(folder: Path) -> list[dict[str, Any]]:
    """The info files of Jupyter servers in ``folder`` and the runtime folder, newest first."""
    import json

    folders = [folder]
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        folders.append(Path(jupyter_runtime_dir()))
    except Exception:
        pass
    files: dict[Path, float] = {}
    for d in folders:
        for pattern in ("jpserver-*.json", "nbserver-*.json"):
            for f in d.glob(pattern):
                try:
                    files[f.resolve()] = f.stat().st_mtime
                except OSError:
                    pass
    infos = []
    for f in sorted(files, key=files.__getitem__, reverse=True):
        try:
            info = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("url"), str):
            infos.append(info)
    return infos


def _session_notebook(info: dict[str, Any], kernel_id: str, timeout: float) -> str:
    """The name of the notebook whose session runs ``kernel_id`` on the server ``info`` describes, or ``""``."""
    import json
    import urllib.request
    from urllib.parse import urlsplit

    from .webhook import is_loopback

    url = info["url"] if info["url"].endswith("/") else info["url"] + "/"
    if not is_loopback(urlsplit(url).hostname or ""):
        return ""
    request = urllib.request.Request(url + "api/sessions", headers={"Accept": "application/json"})
    if info.get("token"):
        request.add_header("Authorization", f"token {info['token']}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with opener.open(request, timeout=timeout) as reply:
        sessions = json.loads(reply.read(1_000_000).decode("utf-8"))
    for s in sessions if isinstance(sessions, list) else []:
        if isinstance(s, dict) and (s.get("kernel") or {}).get("id") == kernel_id:
            path = s.get("path") or (s.get("notebook") or {}).get("path") or ""
            name = Path(str(path)).name
            return name if name.endswith(".ipynb") else ""
    return ""


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

    def send(self, text: str | None = None, *, to: Any = None, thread_key: str | None = None, **kwargs: Any) -> Receipt:
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
