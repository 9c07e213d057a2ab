"""Stand-in for Kaggle's ``kaggle_secrets`` (exists only on Kaggle): the same names and exceptions.

The real client posts to Kaggle's UserSecrets service with the kernel's JWT;
this one reads the JSON file described in tests/standins/README.md. As on
Kaggle, a secret that is missing or not attached to the notebook is a
``BackendError``, and no ``KAGGLE_USER_SECRETS_TOKEN`` is a ``CredentialError``.
"""

import json
import os


class CredentialError(Exception):
    pass


class BackendError(Exception):
    pass


class ValidationError(Exception):
    pass


class UserSecretsClient:
    def __init__(self):
        self.jwt_token = os.getenv("KAGGLE_USER_SECRETS_TOKEN")
        if self.jwt_token is None:
            raise CredentialError(
                "A JWT Token is required to use the UserSecretsClient, "
                "but none found in environment variable KAGGLE_USER_SECRETS_TOKEN")

    def get_secret(self, label) -> str:
        if label is None or len(label) == 0:
            raise ValidationError("Label must be non-empty.")
        entry = _lookup(label)
        if entry is None or not entry.get("access", False):
            response = {"errors": [f"No user secrets exist for kernel id 1 and label {label}"], "wasSuccessful": False}
            raise BackendError(f"Unexpected response from the service. Response: {json.dumps(response)}.")
        return entry["value"]


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
