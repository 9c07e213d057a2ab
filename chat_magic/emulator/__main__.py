"""``python -m chat_magic.emulator [--port N] [--key K --token T] [--space S] [--qps 1.0]``."""

from __future__ import annotations

import sys

from .server import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
