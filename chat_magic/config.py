"""Where messages go: the default webhook and named spaces.

- The default destination is the environment variable
  ``GOOGLE_CHAT_WEBHOOK_URL``, read when a message is sent (never at import).
- Named destinations live in a TOML file, ``CHAT_MAGIC_CONFIG`` or
  ``<user config dir>/chat_magic/config.toml``::

      default = "ml-team"          # optional: used when no env variable is set

      [spaces.ml-team]
      webhook_url = "https://chat.googleapis.com/v1/spaces/AAAA/messages?key=...&token=..."

- The outbox lives in ``CHAT_MAGIC_HOME`` (default: the user's state directory).
- On a cluster, ``CHAT_MAGIC_REDIS_URL`` (or ``redis_url = "redis://..."`` at
  the top of the config file) shares each space's pacing through Redis.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

from .errors import ConfigError, NoDestinationError
from .webhook import Webhook, parse_webhook_url

ENV_URL = "GOOGLE_CHAT_WEBHOOK_URL"
ENV_CONFIG = "CHAT_MAGIC_CONFIG"
ENV_HOME = "CHAT_MAGIC_HOME"
ENV_REDIS = "CHAT_MAGIC_REDIS_URL"

log = logging.getLogger("chat_magic")
_lock = threading.Lock()
_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
_warned_modes: set[str] = set()


def config_path() -> Path:
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("chat_magic", appauthor=False)) / "config.toml"


def home() -> Path:
    """The folder that holds the outbox."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_state_dir

    return Path(user_state_dir("chat_magic", appauthor=False))


def redis_url() -> str | None:
    """The Redis that paces every host (opt-in): ``CHAT_MAGIC_REDIS_URL``, else ``redis_url`` in the config.

    ``off`` (or ``none``) in the variable turns it off where the config file sets one.
    A config file that cannot be read counts as none here: sending reports it.
    """
    value = os.environ.get(ENV_REDIS, "").strip()
    if not value:
        try:
            value = str(load_config().get("redis_url") or "").strip()
        except ConfigError:
            return None
    return None if value.lower() in ("", "off", "none") else value


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The parsed config file, or ``{}`` when there is none. Cached by mtime."""
    path = path or config_path()
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror}") from None
    sig = (st.st_mtime_ns, st.st_size)
    with _lock:
        hit = _cache.get(str(path))
        if hit and hit[0] == sig:
            return hit[1]
    if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and str(path) not in _warned_modes:
        _warned_modes.add(str(path))
        import warnings

        warnings.warn(
            f"chat_magic: {path} holds webhook secrets but is readable by others: run chmod 600 {path}",
            stacklevel=4,
        )
    tomllib = _toml()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: bad TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the config file {path}: {e}") from None
    spaces = data.get("spaces", {})
    if not isinstance(spaces, dict) or any(not isinstance(v, dict) for v in spaces.values()):
        raise ConfigError(f"{path}: [spaces] must hold tables such as [spaces.my-team] with webhook_url = \"...\"")
    with _lock:
        _cache[str(path)] = (sig, data)
    return data


def destination_names() -> list[str]:
    """Names of the spaces in the config file."""
    return sorted(load_config().get("spaces", {}))


def resolve(to: str | Webhook | None = None) -> Webhook:
    """The checked webhook for ``to``: a name from the config, a URL, or the default.

    Raises a :class:`ConfigError` subclass with one line that says how to fix it.
    """
    if isinstance(to, Webhook):
        return to
    if to is not None and not isinstance(to, str):
        raise NoDestinationError(f"to= takes a space name or a webhook URL, not {type(to).__name__}")
    if to and "://" in to:
        return parse_webhook_url(to)
    if to:
        cfg = load_config()
        spaces = cfg.get("spaces", {})
        if to not in spaces:
            if any(c in to for c in "/?="):  # a webhook URL without its scheme, or a piece of one: never echo it
                return parse_webhook_url(to)  # raises a one-line, redacted WebhookURLError
            known = ", ".join(sorted(spaces)) or "none"
            raise NoDestinationError(f"unknown space {to!r} (known: {known}): add [spaces.{to}] with webhook_url to {config_path()}")
        return _from_table(to, spaces[to])
    env = os.environ.get(ENV_URL, "").strip()
    if env:
        try:
            return parse_webhook_url(env)
        except ConfigError as e:
            raise type(e)(f"{ENV_URL}: {e}") from None
    cfg = load_config()
    default = cfg.get("default")
    if default:
        return resolve(str(default))
    spaces = cfg.get("spaces", {})
    if len(spaces) == 1:
        (name, table), = spaces.items()
        return _from_table(name, table)
    raise NoDestinationError(f"no webhook configured: set {ENV_URL} or add a space to {config_path()}")


def _from_table(name: str, table: dict[str, Any]) -> Webhook:
    url = table.get("webhook_url")
    if not url:
        raise NoDestinationError(f"[spaces.{name}] in {config_path()} has no webhook_url")
    try:
        return parse_webhook_url(url)
    except ConfigError as e:
        raise type(e)(f"[spaces.{name}]: {e}") from None
