"""Both pacers are handed to the outbox, which asks them and claims by itself (issue 20).

``Outbox.claim -> RedisSlot.claim -> Outbox.claim_local`` was a call loop
(and, for the types, an import cycle): a pacer now only answers questions.
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

from chat_magic import outbox, pacing
from chat_magic.outbox import Outbox, PacingTable
from chat_magic.pacing import SqlitePacer
from chat_magic.webhook import parse_webhook_url

OUTBOX_METHODS = {name for name in vars(Outbox) if not name.startswith("__")}


def test_no_pacer_calls_the_outbox():
    tree = ast.parse(Path(pacing.__file__).read_text(encoding="utf-8"))
    called = sorted({node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Attribute) and node.func.attr in OUTBOX_METHODS
                     and node.func.attr not in {"close"}})
    assert called == [] and not hasattr(pacing, "Claimer") and not hasattr(pacing.RedisSlot, "claim")
    assert {"claim", "claim_local", "ready_spaces"} <= OUTBOX_METHODS  # the names looked for exist


def test_the_local_pacer_decides_and_the_outbox_keeps_the_table(tmp_path: Path):
    """The slot is taken in the claim's transaction and held after an answer, never opened earlier by a hold."""
    hook = parse_webhook_url("https://chat.googleapis.com/v1/spaces/PACE/messages?key=k&token=t")
    box = Outbox(tmp_path / "outbox.sqlite3", pacer=SqlitePacer())
    box.enqueue(hook, None, [(json.dumps({"text": t}), False) for t in ("one", "two")])
    now = time.time()
    job = box.claim(now, interval=30.0, lease=30)
    assert job is not None and box.claim(time.time(), interval=30.0, lease=30) is None  # the slot is closed for 30 s
    box.ack(job, "spaces/PACE/messages/1", None, space_free_at=now + 5)  # a shorter hold does not open it earlier
    with box._write() as db:
        assert SqlitePacer().free_at(PacingTable(db), hook.space_key) >= now + 30
        assert SqlitePacer().free_at(PacingTable(db), "spaces/NEVER") == 0.0
    assert outbox.SqlitePacer is pacing.SqlitePacer
