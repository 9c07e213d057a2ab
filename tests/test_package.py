"""The package surface: a light import, an explicit __all__, lazy attributes."""

import subprocess
import sys

import chat_magic


def test_import_is_light():
    code = ("import sys, chat_magic; heavy = [m for m in ('IPython', 'ipywidgets', 'requests', 'sqlite3', 'urllib3')"
            " if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at import time: {out.stdout}"


def test_all_matches_what_is_exported():
    public = {n for n in dir(chat_magic) if not n.startswith("_")} | set(chat_magic._LAZY)
    modules = {"errors", "config", "webhook", "message", "outbox", "delivery", "session", "report", "cli",
               "magics", "notify", "composer", "progress", "run", "ranks", "demo", "emulator", "chatsyntax",
               "metrics", "runall", "integrations",
               "annotations", "TYPE_CHECKING", "Any"}
    assert set(chat_magic.__all__) == (public - modules) | {"__version__"}
    for name in chat_magic.__all__:
        assert getattr(chat_magic, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    try:
        chat_magic.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_configure_refuses_unknown_settings():
    import pytest

    with pytest.raises(chat_magic.ConfigError, match="unknown setting 'speed'"):
        chat_magic.configure(speed=3)
