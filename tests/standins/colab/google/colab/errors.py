"""Stand-in for ``google.colab.errors``: the base class Colab's SecretNotFoundError derives from."""


class Error(Exception):
    """Base class for all Colab errors."""
