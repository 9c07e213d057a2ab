"""chat_magic: post notebook results and job completions to a Google Chat space.

    %load_ext chat_magic            # in IPython / Jupyter
    import chat_magic
    chat_magic.send("training done")  # returns at once; a background worker delivers

The destination is ``GOOGLE_CHAT_WEBHOOK_URL`` or a named space in the config
file (see :mod:`chat_magic.config`). Importing this package is cheap: IPython,
ipywidgets, requests and sqlite3 load when first needed.
"""

from __future__ import annotations

import _thread
import os as _os
import sys as _sys
import time as _time
from typing import TYPE_CHECKING, Any

from . import hooks as _hooks
from .errors import (
    ChatMagicError,
    ConfigError,
    DeliveryError,
    DeliveryFailed,
    DeliveryTimeout,
    MessageError,
    NoDestinationError,
    OutboxError,
    SecretAccessError,
    WebhookURLError,
)

__version__ = "0.1.0"

__all__ = [
    "ChatMagicError",
    "Composer",
    "ConfigError",
    "Delivered",
    "DeliveryError",
    "DeliveryFailed",
    "DeliveryTimeout",
    "MessageError",
    "NoDestinationError",
    "OutboxError",
    "Receipt",
    "SecretAccessError",
    "WebhookURLError",
    "__version__",
    "configure",
    "flush",
    "load_ipython_extension",
    "notify_when_done",
    "send",
    "tqdm",
    "unload_ipython_extension",
]

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "Receipt": "delivery",
    "Delivered": "delivery",
    "notify_when_done": "notify",
    "Composer": "composer",
    "tqdm": "progress",
}

if TYPE_CHECKING:  # pragma: no cover
    from .composer import Composer
    from .delivery import Delivered, Receipt
    from .notify import notify_when_done
    from .progress import tqdm


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'chat_magic' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def send(
    text: str | None = None,
    *,
    to: str | None = None,
    thread_key: str | None = None,
    cards: list[dict[str, Any]] | None = None,
    fallback_text: str | None = None,
    truncate: bool = False,
    image: Any = None,
) -> Receipt:
    """Queue a message for the space and return a :class:`Receipt` at once.

    ``to`` is a space name from the config file (default: ``GOOGLE_CHAT_WEBHOOK_URL``).
    ``thread_key`` puts the message into that thread. Text over Chat's limits is
    split into several messages in order, or cut with a note when ``truncate``.
    Raises only for a mistake in the call or the set-up (one-line
    :class:`ConfigError` / :class:`MessageError`); delivery problems never raise
    here: see ``Receipt.wait``.

    ``image``: a matplotlib figure, a PIL image, PNG/JPEG bytes or a path (or
    a list of them), shown in a card under the text. It is uploaded to your
    image store (``CHAT_MAGIC_IMAGE_STORE``, see the README's "Figures") by
    the background worker; without a store the text says it was left out.
    """
    args: dict[str, Any] = {"to": to, "thread_key": thread_key, "cards": cards, "fallback_text": fallback_text, "truncate": truncate,
                            "image": image}
    impl: Any = _loaded.get("send")  # no import statement once loaded: late in shutdown none works
    if impl is None:
        me = _thread.get_ident()
        if me in _loading:  # a signal handler, while this thread loads the delivery module: queued right after
            _early.append((text, args))
            return None  # type: ignore[return-value]
        _loading.add(me)
        try:
            from .delivery import send as impl  # type: ignore[no-redef]
        except ImportError:  # a __del__ late in shutdown, before any send: nothing can be loaded
            impl = _cannot_send
        finally:
            _loading.discard(me)
    receipt = impl(text, **args)
    while _early:
        early_text, early_args = _early.pop(0)
        impl(early_text, **early_args)
    return receipt


_loaded = _hooks.entry  # chat_magic.delivery's send, once it is imported
_loading: set[int] = set()  # threads importing it now
_early: list[tuple[Any, dict[str, Any]]] = []  # sent by a signal handler during that import


def _before_fork() -> None:
    """A fork waits (5 s at most) while another thread imports the delivery modules.

    A module being imported at the fork stays locked in the child forever:
    the child's first ``send`` would hang importing it.
    """
    deadline = _time.monotonic() + 5.0
    waited = False
    while _loading - {_thread.get_ident()} and _time.monotonic() < deadline:
        waited = True
        _time.sleep(0.001)
    box = _sys.modules.get("chat_magic.outbox")
    hold = getattr(box, "hold_for_fork", None)  # None while that module is still half-imported
    if waited and hold is not None:
        hold()  # loaded while this fork waited: its own hook was not in this fork's list


if hasattr(_os, "register_at_fork"):
    import logging as _logging  # noqa: F401 - its fork hooks first: none may be added while a fork waits here

    _os.register_at_fork(before=_before_fork)


def _cannot_send(*args: Any, **kwargs: Any) -> Any:
    """A first send late in the interpreter's shutdown: nothing can be loaded any more; say so, do not raise."""
    try:
        print("chat_magic: a message sent during the interpreter's shutdown, before chat_magic was ever used, "
              "cannot be queued (nothing can be loaded any more): send it earlier, e.g. from an atexit handler",
              file=_sys.stderr, flush=True)
    except Exception:
        pass
    return None


def flush(timeout: float | None = 30.0) -> bool:
    """Wait until nothing is queued; return whether everything was delivered."""
    from .delivery import flush as _flush

    return _flush(timeout)


def configure(**settings: Any) -> None:
    """Change delivery settings, e.g. ``configure(interval=1.1, read_timeout=20)``."""
    from .delivery import settings as current

    current.change(**settings)


def load_ipython_extension(ip: Any) -> None:
    """Called by ``%load_ext chat_magic``."""
    from .magics import load_ipython_extension as _load

    _load(ip)


def unload_ipython_extension(ip: Any) -> None:
    """Called by ``%unload_ext chat_magic``."""
    from .magics import unload_ipython_extension as _unload

    _unload(ip)


def _configured_webhook(digest: str) -> Any:
    """A configured webhook by its digest, for unpickling; ``config`` is imported only when one is looked up."""
    from .config import webhook_by_digest

    return webhook_by_digest(digest)


def _wire() -> None:
    """Connect the parts that must not import each other (``webhook`` sits below ``config``)."""
    from .webhook import add_finder

    add_finder(_configured_webhook)


_wire()
