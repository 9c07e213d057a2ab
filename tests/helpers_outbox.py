"""Messages left in the outbox by another process: what an outage followed by an exit leaves behind.

Used by the damaged-outbox and recovery tests (``test_hardening.py``, ``test_receipts.py``), and
the old single-file format for the migration and listing tests (``test_outbox_list_hosts.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

QUEUER = """
import sys, chat_magic
from chat_magic import delivery
delivery.settings.exit_timeout = 0
delivery.settings.backoff_base = delivery.settings.backoff_cap = 600
n, pad = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    chat_magic.send(f"queued {i:02d}" + (" " + "·" * pad if pad else ""), thread_key=f"q{i:02d}")
sys.exit(0)
"""


def queued_by_another_process(space, n: int, pad: int = 0) -> None:
    """``queued 00``..: ``n`` messages queued in this test's outbox by a process that exits while ``space`` is down.

    ``pad``: that many ``·`` after a space, so each message fills more of the file's pages.
    """
    space.emu.set_down(True)
    try:
        subprocess.run([sys.executable, "-c", QUEUER, str(n), str(pad)], env=dict(os.environ), check=True, timeout=60)
    finally:
        space.emu.set_down(False)


# the message table of an outbox file from before this round (no columns added since): a file to carry over
OLD_MESSAGE_TABLE = """
CREATE TABLE message (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, url TEXT NOT NULL,
    space_key TEXT NOT NULL, thread_key TEXT, payload TEXT NOT NULL, mergeable INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, owner TEXT, lease_until REAL, merged_into INTEGER, name TEXT, thread_name TEXT,
    error_code INTEGER, error_status TEXT, error TEXT);
"""
