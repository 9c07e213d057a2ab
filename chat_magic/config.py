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

Where a webhook comes from, first match wins (:func:`resolve`):

1. an explicit ``to=`` / ``--to``: a URL, or a space name (then 2-5 with the
   secret ``GOOGLE_CHAT_WEBHOOK_URL_<NAME>``, e.g. ``ml-team`` -> ``..._ML_TEAM``,
   then ``[spaces.NAME]`` in the config file);
2. the environment variable ``GOOGLE_CHAT_WEBHOOK_URL``;
3. on Google Colab, the Secrets panel (``google.colab.userdata``);
4. on Kaggle, its secrets (``kaggle_secrets.UserSecretsClient``);
5. the config file (``default``, or its only space).

A hosted secret that exists but that the notebook may not read is a one-line
:class:`SecretAccessError` saying how to grant access, never a fall-through to
the next source. Hosted look-ups are remembered for :data:`SECRET_TTL` seconds.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, NoDestinationError, SecretAccessError
from .webhook import Webhook, parse_webhook_url, redact

__all__ = [
    "ENV_REDIS", "ENV_URL", "check_space_name", "config_path", "describe", "destination_names", "env_secret",
    "forget_secrets", "from_secrets", "home", "hosted_service", "load_config", "redis_url", "remove_space",
    "resolve", "save_space", "secret_name", "webhook_by_digest", "write_config"
]

ENV_URL = "GOOGLE_CHAT_WEBHOOK_URL"
ENV_CONFIG = "CHAT_MAGIC_CONFIG"
ENV_HOME = "CHAT_MAGIC_HOME"
ENV_REDIS = "CHAT_MAGIC_REDIS_URL"

log = logging.getLogger("chat_magic")
_lock = threading.RLock()  # reentrant: a signal handler's send() may run while this thread holds it
_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
_warned_modes: set[str] = set()
SECRET_TTL = 60.0  # seconds a hosted secret (or its absence) is remembered: each look-up is a round trip
_secrets: dict[tuple[str, str], tuple[float, str | None]] = {}



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


def _toml() -> Any:
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
    if to and ("://" in to or any(c in to for c in "/?=")):
        return parse_webhook_url(to)  # a URL, or a piece of one: a one-line, redacted WebhookURLError, never echoed
    if to:
        found = from_secrets(secret_name(to))
        if found is not None:
            return found
        cfg = load_config()
        spaces = cfg.get("spaces", {})
        if to not in spaces:
            known = ", ".join(sorted(spaces)) or "none"
            raise NoDestinationError(
                f"unknown space {to!r} (known: {known}): add [spaces.{to}] with webhook_url to {config_path()} "
                f"(chat-magic spaces add {to}), or set the secret {secret_name(to)}"
            )
        return _from_table(to, spaces[to])
    found = from_secrets(ENV_URL)
    if found is not None:
        return found
    cfg = load_config()
    default = cfg.get("default")
    if default:
        return resolve(str(default))
    spaces = cfg.get("spaces", {})
    if len(spaces) == 1:
        (name, table), = spaces.items()
        return _from_table(name, table)
    raise NoDestinationError(f"no webhook configured: {_how_to_set(ENV_URL)}")


def secret_name(space: str | None = None) -> str:
    """The secret (or environment variable) holding a space's webhook.

    ``GOOGLE_CHAT_WEBHOOK_URL`` for the default, ``GOOGLE_CHAT_WEBHOOK_URL_ML_TEAM``
    for ``ml-team``: upper case, anything but letters and digits an underscore,
    as hosted secrets panels expect.
    """
    if not space:
        return ENV_URL
    return f"{ENV_URL}_{re.sub(r'[^A-Za-z0-9]+', '_', space).strip('_').upper()}"


def hosted_service() -> str:
    """``Colab``, ``Kaggle``, ``Databricks`` when this process runs there, else ``""``.

    Colab's kernel itself lives in ``google.colab`` and its runtime sets
    ``COLAB_RELEASE_TAG``; Kaggle sets ``KAGGLE_KERNEL_RUN_TYPE``; Databricks
    ``DATABRICKS_RUNTIME_VERSION``. Checked before asking a secrets module, so that
    a stray ``google-colab`` package elsewhere is never asked (its ``get`` would
    wait for a Colab frontend forever).
    """
    if sys.modules.get("google.colab") is not None or os.environ.get("COLAB_RELEASE_TAG"):
        return "Colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "Kaggle"
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return "Databricks"
    return ""


def _how_to_set(name: str) -> str:
    """How to provide ``name`` here: the advice fits the host the code runs on."""
    anywhere = f"set {name} or add a space to {config_path()} (chat-magic spaces add NAME; in a notebook: %chat_setup)"
    host = hosted_service()
    if host == "Colab":
        return f"add the secret {name} in Colab's Secrets panel (the key icon) with Notebook access on, or {anywhere}"
    if host == "Kaggle":
        return f"add the secret {name} under Add-ons > Secrets and attach it to this notebook, or {anywhere}"
    return anywhere


def from_secrets(name: str) -> Webhook | None:
    """The webhook in the first of: environment variable, Colab secret, Kaggle secret called ``name``."""
    found = _first_secret(name)
    return found[1] if found else None


def _first_secret(name: str) -> tuple[str, Webhook] | None:
    """(where, webhook) from the first source that has ``name``: its value checked, its errors one line."""
    sources: tuple[tuple[str, Callable[[str], str | None]], ...] = (
        ("environment variable", env_secret), ("Colab secret", _colab_secret), ("Kaggle secret", _kaggle_secret),
    )
    for where, read in sources:
        value = read(name)
        if value:
            try:
                return where, parse_webhook_url(value)
            except ConfigError as e:
                raise type(e)(f"{name if where == sources[0][0] else f'{where} {name}'}: {e}") from None
    return None


def describe(to: str | None = None) -> str:
    """Where :func:`resolve` finds the webhook for ``to``, e.g. ``Colab secret GOOGLE_CHAT_WEBHOOK_URL: spaces/AAAA``.

    Never shows a key or token; raises like :func:`resolve` when there is none.
    """
    webhook = resolve(to)
    if to and any(c in to for c in "/?="):
        return f"the URL given: spaces/{webhook.space}"
    found = _first_secret(secret_name(to))
    if found and found[1] == webhook:
        return f"{found[0]} {secret_name(to)}: spaces/{webhook.space}"
    return f"the config file {config_path()}: spaces/{webhook.space}"


def forget_secrets() -> None:
    """Drop remembered hosted secrets and host modules (after adding a secret, and in tests)."""
    with _lock:
        _secrets.clear()
        _hosts.clear()


def env_secret(name: str) -> str | None:
    """The environment variable ``name``, stripped; None when unset or blank (read when called, never at import)."""
    return os.environ.get(name, "").strip() or None


_hosts: dict[str, Any] = {}


def _host_module(name: str) -> Any:
    """A module that exists only on a hosted notebook service, or None (looked for once per process)."""
    with _lock:
        if name in _hosts:
            return _hosts[name]
    try:
        from importlib import import_module

        module: Any = import_module(name)
    except ImportError:
        module = None
    with _lock:
        _hosts[name] = module
    return module


def _remembered(source: str, name: str, read: Callable[[], str | None]) -> str | None:
    now = time.monotonic()
    with _lock:
        hit = _secrets.get((source, name))
    if hit and now - hit[0] < SECRET_TTL:
        return hit[1]
    value = read()
    with _lock:
        _secrets[(source, name)] = (now, value)
    return value


def _colab_secret(name: str) -> str | None:
    """``google.colab.userdata.get(name)``; None off Colab or without such a secret."""
    userdata = _host_module("google.colab.userdata") if hosted_service() == "Colab" else None
    if userdata is None:
        return None

    def read() -> str | None:
        try:
            return str(userdata.get(name) or "").strip() or None
        except userdata.SecretNotFoundError:
            return None
        except userdata.NotebookAccessError:
            raise SecretAccessError(
                f"this notebook may not read the Colab secret {name}: open the Secrets panel (the key icon on the left) "
                f"and switch on Notebook access for {name}, then run the cell again"
            ) from None
        except Exception as e:  # TimeoutException: not run from the Colab UI
            raise ConfigError(f"cannot read the Colab secret {name}: {type(e).__name__}: {redact(e)}") from None

    return _remembered("colab", name, read)


def _kaggle_secret(name: str) -> str | None:
    """``UserSecretsClient().get_secret(name)``; None off Kaggle or when no such secret is attached."""
    kaggle = _host_module("kaggle_secrets") if hosted_service() == "Kaggle" else None
    if kaggle is None:
        return None

    def read() -> str | None:
        try:
            return str(kaggle.UserSecretsClient().get_secret(name) or "").strip() or None
        except kaggle.BackendError:
            return None  # Kaggle answers the same for a missing secret and one not attached to this notebook
        except Exception as e:  # CredentialError, ConnectionError: not in a Kaggle kernel, or offline
            raise ConfigError(f"cannot read the Kaggle secret {name}: {type(e).__name__}: {redact(e)}") from None

    return _remembered("kaggle", name, read)


def _from_table(name: str, table: dict[str, Any]) -> Webhook:
    url = table.get("webhook_url")
    if not url:
        raise NoDestinationError(f"[spaces.{name}] in {config_path()} has no webhook_url")
    try:
        return parse_webhook_url(url)
    except ConfigError as e:
        raise type(e)(f"[spaces.{name}]: {e}") from None


# -- writing the config file (chat-magic spaces, %chat_setup) ---------------------------

SPACE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_space_name(name: str) -> str:
    """``name`` if it can name a space (a bare TOML key and a secret suffix), else a one-line ConfigError."""
    if not isinstance(name, str) or not SPACE_NAME.match(name):
        raise ConfigError(f"a space name is 1 to 64 letters, digits, '-' or '_' (such as ml-team), not {name!r}")
    return name


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        import json

        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write a {type(value).__name__} to the config file")


def _toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else _toml_value(key)


def _toml_dump(data: dict[str, Any], prefix: str = "") -> str:
    """The config as TOML: plain keys first, then one ``[table]`` per nested dict."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}{_toml_key(k)}"
            own = {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)}
            if own or not v:
                out += f"\n[{name}]\n" + "".join(f"{_toml_key(kk)} = {_toml_value(vv)}\n" for kk, vv in own.items())
            out += _toml_dump({kk: vv for kk, vv in v.items() if isinstance(vv, dict)}, prefix=f"{name}.")
    return out


def write_config(data: dict[str, Any], path: Path | None = None) -> Path:
    """Write the whole config file, mode 0600, atomically (comments in it are not kept)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_toml_dump(data).lstrip("\n"))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with _lock:
        _cache.pop(str(path), None)
    return path


def save_space(name: str, webhook: Webhook, *, make_default: bool = False) -> Path:
    """Add (or replace) ``[spaces.NAME]`` with this webhook; return the file written."""
    check_space_name(name)
    data = dict(load_config().items())
    spaces = dict(data.get("spaces", {}))
    spaces[name] = {**spaces.get(name, {}), "webhook_url": webhook.reveal_url()}
    data["spaces"] = spaces
    if make_default:
        data["default"] = name
    return write_config(data)


def remove_space(name: str) -> Path:
    """Remove ``[spaces.NAME]`` (and ``default`` if it named it); an unknown name is a NoDestinationError."""
    data = dict(load_config().items())
    spaces = dict(data.get("spaces", {}))
    if name not in spaces:
        known = ", ".join(sorted(spaces)) or "none"
        raise NoDestinationError(f"no space {name!r} in {config_path()} (known: {known})")
    del spaces[name]
    data["spaces"] = spaces
    if data.get("default") == name:
        del data["default"]
    return write_config(data)


def webhook_by_digest(digest: str) -> Webhook | None:
    """The configured webhook (the default one, or a named space) whose digest is ``digest``, if any.

    How a pickled webhook finds its secrets again in another process: see
    :func:`chat_magic.webhook.add_finder`.
    """
    try:
        names: list[str | None] = [None, *destination_names()]
    except Exception:
        names = [None]
    for name in names:
        try:
            hook = resolve(name)
        except Exception:
            continue
        if hook.id == digest:
            return hook
    return None
