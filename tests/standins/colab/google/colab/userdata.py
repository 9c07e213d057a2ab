"""Stand-in for Colab's ``google.colab.userdata`` (exists only on Colab): the same names and exceptions.

The real ``get`` asks the Colab frontend for the secret; this one reads the
JSON file described in tests/standins/README.md.
"""

import json
import os

from google.colab import errors


class NotebookAccessError(Exception):
    """Exception thrown when the current notebook doesn't have access to the requested secret."""

    def __init__(self, key):
        super().__init__(f"Notebook does not have access to secret {key}")


class SecretNotFoundError(errors.Error):
    """Exception thrown when the requested secret is not found."""

    def __init__(self, key):
        super().__init__(f"Secret {key} does not exist.")


class TimeoutException(errors.Error):
    """Exception thrown when requesting a secret times out."""

    def __init__(self, key):
        super().__init__(f"Requesting secret {key} timed out. Secrets can only be fetched when running from the Colab UI.")


def get(key):
    """Fetches the value for specified secret keys (as Colab's: SecretNotFoundError, then NotebookAccessError)."""
    entry = _lookup(key)
    if entry is None:
        raise SecretNotFoundError(key)
    if not entry.get("access", False):
        raise NotebookAccessError(key)
    return entry.get("value", "")


def _lookup(key):
    """The stand-in's store: the JSON file in CHAT_MAGIC_STANDIN_SECRETS (see tests/standins/README.md)."""
    calls = os.environ.get("CHAT_MAGIC_STANDIN_CALLS")
    if calls:
        with open(calls, "a", encoding="utf-8") as f:
            f.write(key + "\n")
    path = os.environ.get("CHAT_MAGIC_STANDIN_SECRETS")
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get(key)
