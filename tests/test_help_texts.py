"""Help texts a user reads: ``%%chat?`` and friends render as plain text, and every ``--mention`` help says what works.

The magics are read from a real IPython shell (what ``%%chat?`` shows); the
command line's help from the real ``chat-magic`` entry point in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.jupyter  # IPython 7.34 (Colab) builds the help page too: CI runs it there


def _magics(ip) -> list[tuple[str, object]]:
    """Every magic chat_magic registers: ('%%chat', func), ('%chat', func), ..."""
    registered = ip.magics_manager.registry["ChatMagics"].magics
    found = [(f"%%{name}", ip.find_cell_magic(name)) for name in registered["cell"]]
    found += [(f"%{name}", ip.find_line_magic(name)) for name in registered["line"]]
    assert {"%%chat", "%chat", "%chat_autonotify", "%chat_thread"} <= {n for n, _ in found}
    return found


def test_every_magic_help_page_is_plain_text_without_rest_markup(ip):
    for name, func in _magics(ip):
        for text in (func.__doc__ or "", ip.object_inspect_text(name)):
            assert text.strip(), f"{name} has a help page"
            lines = [line.strip() for line in text.splitlines()]
            assert "::" not in lines, f"{name}? shows a bare '::' line:\n{text[:300]}"
            assert not any(line.endswith("::") for line in lines), f"{name}? ends a line with reST '::':\n{text}"
            assert "``" not in text, f"{name}? shows reST double backticks:\n{text}"


def test_the_help_page_starts_with_the_usage_line(ip):
    doc = ip.find_cell_magic("chat").__doc__
    first, second = doc.splitlines()[:2]
    assert first.startswith("%%chat [--to NAME]"), first
    # a usage that wraps continues under the first option, as argparse lays it out in a terminal
    assert second.startswith(" " * len("%%chat ") + "[") and not second.startswith(" " * (len("%%chat ") + 1)), repr(second)


def test_mention_help_names_email_addresses_in_every_front_end(ip):
    """`--mention alice@example.com` works everywhere; every help says so (not "'all' or a user id")."""
    from chat_magic import notify_when_done

    for name in ("%%chat", "%chat", "%chat_autonotify"):
        func = ip.find_cell_magic("chat") if name == "%%chat" else ip.find_line_magic(name.lstrip("%"))
        assert "e-mail" in func.__doc__, f"{name}'s --mention help: {func.__doc__}"
    assert "e-mail" in " ".join((notify_when_done.__doc__ or "").split())
    out = subprocess.run([sys.executable, "-m", "chat_magic.cli", "run", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    mention = " ".join(out.stdout.split("\n  --mention", 1)[1].split("--no-cards", 1)[0].split())
    assert "e-mail" in mention, mention


def test_mention_help_matches_what_the_rule_accepts():
    from chat_magic import rules

    for who in ("all", "123456789012345678901", "alice@example.com"):
        assert rules.validate_mention(who) == who
    assert "e-mail" in rules.MENTION_HELP and "'all'" in rules.MENTION_HELP
