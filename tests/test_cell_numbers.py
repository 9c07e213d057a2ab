"""A card's traceback names the cell by its number (``Cell In[4]``), on IPython 7 (Colab) as on 8+.

IPython 7 under ipykernel compiles each cell into ``/tmp/ipykernel_PID/HASH.py``
and keeps no record of its number, so cards said ``Cell`` alone. Each test
runs a notebook in a real kernel (nbclient + ipykernel) posting to the
emulator; CI runs them on Colab's IPython 7.34 stack too (``-m jupyter``).
"""

from __future__ import annotations

import html
import re

import pytest
from conftest import wait_until
from kernels import execute, make_notebook

pytestmark = pytest.mark.jupyter


def _card_texts(space) -> list[str]:
    out = []
    for m in space.messages():
        parts = [m.get("text", "")]
        for entry in m.get("cardsV2", []):
            parts.append(entry["card"].get("header", {}).get("title", ""))
            for sec in entry["card"]["sections"]:
                for w in sec["widgets"]:
                    for kind in ("decoratedText", "textParagraph"):
                        if kind in w:
                            parts.append(html.unescape(re.sub(r"<[^>]+>", "", w[kind]["text"])))
        if m.get("cardsV2"):
            out.append("\n".join(parts))
    return out


def _kernel_env(space) -> dict[str, str]:
    import os

    env = dict(os.environ, GOOGLE_CHAT_WEBHOOK_URL=space.url)
    for name in ("JPY_SESSION_NAME", "CHAT_MAGIC_SOURCE", "CHAT_MAGIC_THREAD_KEY"):
        env.pop(name, None)
    return env


FAILING = "def load():\n    return open('/nonexistent/chat-magic-cells.csv')\n\nload()"


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_autonotify_and_notify_when_done_cards_name_the_cell_number(fast_space, tmp_path):
    nb_path = make_notebook(
        tmp_path / "numbers.ipynb",
        "%load_ext chat_magic\n%chat_autonotify --on-error",
        "x = 1",
        (FAILING, ["raises-exception"]),
        "%chat_autonotify off",
        ("from chat_magic import notify_when_done\nwith notify_when_done('step'):\n    1 / 0", ["raises-exception"]),
        ("%%chat --title Body\nx = 2\nload()", ["raises-exception"]),
        "import chat_magic\nassert chat_magic.flush(60)",  # the kernel paces its sends: all out before it stops
    )
    nb = execute(nb_path, env=_kernel_env(fast_space), log=tmp_path / "kernel.log", allow_errors=True)
    prompts = [c.execution_count for c in nb.cells]
    failing, notify_cell, chat_cell = prompts[2], prompts[4], prompts[5]
    cards = wait_until(lambda: (lambda t: t if len(t) >= 3 else None)(_card_texts(fast_space)), 60, what="three cards")
    auto = next(t for t in cards if "FileNotFoundError" in t and "Body" not in t)
    assert f'"Cell In[{failing}]", line 4' in auto and f'"Cell In[{failing}]", line 2, in load' in auto, auto
    step = next(t for t in cards if "ZeroDivisionError" in t)
    assert f'"Cell In[{notify_cell}]", line 3' in step, step
    body = next(t for t in cards if "Body" in t)
    assert f'"Cell In[{chat_cell}]", line 2' in body and f'"Cell In[{failing}]", line 2, in load' in body, body
    for t in cards:
        assert '"Cell", line' not in t and "ipykernel_" not in t and "/tmp/" not in t, t
