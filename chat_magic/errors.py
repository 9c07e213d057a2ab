"""Exceptions raised by chat_magic.

The hierarchy::

    ChatMagicError
    ├── ConfigError            a user's set-up is wrong (ValueError)
    │   ├── WebhookURLError    a webhook URL is malformed or not Google Chat's
    │   ├── NoDestinationError no webhook configured, or an unknown name
    │   └── SecretAccessError  a hosted notebook may not read the secret (Colab, Kaggle)
    ├── MessageError           a message cannot be sent as given (ValueError)
    ├── OutboxError            the outbox database cannot be used
    └── DeliveryError          the space did not accept a message
        ├── DeliveryFailed     the server refused it for good (a 4xx other than 408/429)
        └── DeliveryTimeout    not delivered within the time asked for

Every message is one line, says what is wrong and how to fix it, and never
contains a webhook's ``key`` or ``token``. In IPython and Jupyter each shows
as that one line, without a traceback (IPython's ``_render_traceback_``
hook): a set-up mistake is not a bug, and a verbose traceback's frame locals
could hold a configuration with webhook URLs in it.
"""

from __future__ import annotations

__all__ = [
    "ChatMagicError", "ConfigError", "DeliveryError", "DeliveryFailed", "DeliveryTimeout", "MessageError",
    "NoDestinationError", "OutboxError", "SecretAccessError", "WebhookURLError"
]


class ChatMagicError(Exception):
    """Base class of every chat_magic error."""

    def _render_traceback_(self) -> list[str]:
        """What IPython shows for it: its one line."""
        return [f"{type(self).__name__}: {self}"]


class ConfigError(ChatMagicError, ValueError):
    """The user's configuration is wrong."""


class WebhookURLError(ConfigError):
    """A webhook URL is malformed or does not point at Google Chat."""


class NoDestinationError(ConfigError):
    """No webhook is configured, or a destination name is unknown."""


class SecretAccessError(ConfigError):
    """A hosted notebook's secret exists but this notebook may not read it (switch on its access)."""


class MessageError(ChatMagicError, ValueError):
    """A message cannot be sent as given (empty, or too large to split)."""


class OutboxError(ChatMagicError):
    """The outbox database cannot be used."""


class DeliveryError(ChatMagicError):
    """A message was not delivered.

    ``code`` is the HTTP status (0 for a network error), ``status`` the
    ``google.rpc`` status name when the server sent one.
    """

    def __init__(self, message: str, *, code: int = 0, status: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class DeliveryFailed(DeliveryError):
    """The server refused the message for good; retrying would not help."""


class DeliveryTimeout(DeliveryError):
    """The message was not delivered within the time asked for."""
