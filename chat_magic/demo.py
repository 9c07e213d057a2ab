"""``chat-magic demo``: run the quickstart notebook against a local Google Chat emulator.

It starts the emulator in this process (a free loopback port, the real
1 request/second quota), points a fresh Jupyter kernel at it through
``GOOGLE_CHAT_WEBHOOK_URL`` (with a throw-away ``CHAT_MAGIC_HOME``), executes
the quickstart notebook (shipped inside the package) with nbclient, waits until every message has
arrived, and prints the thread as it arrived. Nothing leaves the machine;
your own configuration and outbox are not touched.

    chat-magic demo                 # or: python -m chat_magic.demo
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
import secrets
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .console import say
from .rules import seconds_arg
from .webhook import redact

__all__ = ["find_notebook", "format_message", "main"]

PREFIX = "chat-magic demo"

SPACE = "DEMO"
KERNEL = "python3"


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    # inside an installed wheel; else the source checkout this package was loaded from (editable install)
    return [here / "notebooks" / "quickstart.ipynb", here.parent / "notebooks" / "quickstart.ipynb"]


def find_notebook() -> Path | None:
    """The quickstart notebook shipped in the package, or that of the source tree."""
    return next((p for p in _candidates() if p.is_file()), None)


def _plain(card_html: str) -> str:
    text = re.sub(r"<br\s*/?>", "\n", card_html)
    return html.unescape(re.sub(r"<[^>]+>", "", text))


def _local_time(rfc3339: str) -> str:
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).astimezone().strftime("%H:%M:%S")
    except (ValueError, AttributeError):
        return "--:--:--"


def _indent(text: str, prefix: str = "    ", max_lines: int = 14) -> list[str]:
    lines = text.rstrip("\n").splitlines() or [""]
    if len(lines) > max_lines:
        lines = [f"[… {len(lines) - max_lines} more lines]"] + lines[-max_lines:]
    return [prefix + line for line in lines]


def format_message(m: dict[str, Any]) -> list[str]:
    """A stored message as readable lines: time, thread, then its text or its card."""
    thread = (m.get("thread") or {}).get("name", "").rsplit("/", 1)[-1]
    head = f"[{_local_time(m.get('createTime', ''))}] thread {thread}"
    out: list[str] = []
    cards = m.get("cardsV2") or []
    if m.get("text"):
        out.append(head)
        out.extend(_indent(m["text"]))
    for entry in cards:
        card = entry.get("card") or {}
        title = (card.get("header") or {}).get("title", "")
        out.append(f"{head}  [card] {title}".rstrip())
        for section in card.get("sections") or []:
            if section.get("header"):
                out.append(f"    {section['header']}:")
            for w in section.get("widgets") or []:
                if "decoratedText" in w:
                    d = w["decoratedText"]
                    label = f"{d['topLabel']}: " if d.get("topLabel") else ""
                    out.append(f"    {label}{_plain(d.get('text', ''))}")
                elif "textParagraph" in w:
                    out.extend(_indent(_plain(w["textParagraph"].get("text", "")), "      "))
    if not out:
        out.append(head)
    return out


def _last_lines(path: Path, n: int = 10) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [redact(line) for line in text.splitlines()[-n:]]


def _settle(emu: Any, space: str, deadline: float, quiet: float = 2.5) -> list[dict]:
    """Poll until no new message has arrived for ``quiet`` seconds (or the deadline)."""
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = len(emu.messages(space))
        if n != count:
            count, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.2)
    return emu.messages(space)


def _flush_leftovers(home: Path, timeout: float) -> None:
    """Deliver what the kernel queued but had no time to send before it exited."""
    from .delivery import Dispatcher
    from .hosts import outbox_path
    from .outbox import Outbox

    path = outbox_path(home)
    if not path.exists():
        return
    d = Dispatcher(Outbox(path))
    try:
        d.flush(timeout)
    finally:
        d.stop(2.0)
        d.outbox.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chat-magic demo",
        description="Run the quickstart notebook in a fresh kernel against a local Google Chat emulator and print the thread that arrived.",
    )
    parser.add_argument("--notebook", type=Path, default=None, help="the notebook to run (default: notebooks/quickstart.ipynb)")
    parser.add_argument("--timeout", type=seconds_arg(above=True), default=120, metavar="S",
                        help="seconds allowed per cell (default 120; 90s, 5m, 1h work too)")
    args = parser.parse_args(argv)

    nb_path = args.notebook or find_notebook()
    if nb_path is None or not Path(nb_path).is_file():
        where = nb_path or _candidates()[0]
        say(f"the notebook {where} is not there: reinstall chat-magic, or pass --notebook PATH", prefix=PREFIX)
        return 2
    nb_path = Path(nb_path).resolve()
    try:
        import nbformat
        from jupyter_client.kernelspec import NoSuchKernel
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
        from traitlets.config import Config
    except ImportError as e:
        say(f"{e.name} is missing: pip install 'chat-magic[demo]' (nbclient and ipykernel)", prefix=PREFIX)
        return 2

    from .emulator import Emulator

    with tempfile.TemporaryDirectory(prefix="chat_magic-demo-") as tmp, Emulator(
        key=secrets.token_urlsafe(18), token=secrets.token_urlsafe(18)
    ) as emu:
        home = Path(tmp) / "home"
        env = dict(os.environ)
        env.pop("CHAT_MAGIC_THREAD_KEY", None)
        env.update(
            GOOGLE_CHAT_WEBHOOK_URL=emu.webhook_url(SPACE),
            CHAT_MAGIC_HOME=str(home),
            CHAT_MAGIC_CONFIG=str(Path(tmp) / "no-config.toml"),
            CHAT_MAGIC_EXIT_TIMEOUT="8",
            JPY_SESSION_NAME=str(nb_path),
        )
        print(f"chat-magic demo: running {nb_path.name} in a fresh {KERNEL} kernel;")
        print(f"messages go to a local Google Chat emulator at {emu.base_url} (nothing leaves this machine).")
        print()

        nb = nbformat.read(nb_path, as_version=4)
        cfg = Config()
        cfg.KernelManager.shutdown_wait_time = 20.0  # the kernel's exit hook delivers what is left
        client = NotebookClient(
            nb,
            kernel_name=KERNEL,
            timeout=math.ceil(args.timeout),  # an int: nbclient 0.10 with traitlets 5.7 refuses a float
            allow_errors=False,
            config=cfg,
            resources={"metadata": {"path": str(nb_path.parent)}},
        )
        started = time.monotonic()
        log_path = Path(tmp) / "kernel.log"
        try:
            with open(log_path, "wb") as log:  # the kernel's own chatter, shown only if it fails
                client.execute(env=env, stdout=log, stderr=log)
        except NoSuchKernel:
            say(f"no '{KERNEL}' Jupyter kernel: run {Path(sys.executable).name} -m ipykernel install --user", prefix=PREFIX)
            return 1
        except KeyboardInterrupt:
            say("interrupted", prefix=PREFIX)
            return 130
        except CellExecutionError as e:
            lines = [ln for ln in redact(e).splitlines() if ln.strip()]
            say(f"a cell failed: {lines[-1] if lines else 'error'}", prefix=PREFIX)
            return 1
        except Exception as e:  # a kernel that would not start, a timeout
            say(f"the notebook did not run: {type(e).__name__}: {e}", prefix=PREFIX)
            for line in _last_lines(log_path):
                print(f"  kernel: {line}", file=sys.stderr)
            return 1
        ran = time.monotonic() - started

        _flush_leftovers(home, 30.0)
        messages = _settle(emu, SPACE, time.monotonic() + 30.0)
        threads = {m["thread"]["name"] for m in messages}

        for m in messages:
            for line in format_message(m):
                print(line)
            print()
        word = "thread" if len(threads) == 1 else "threads"
        print(f"chat-magic demo: the notebook ran in {ran:.1f} s; the space got {len(messages)} messages in {len(threads)} {word}.")
        if not messages:
            say("no message arrived", prefix=PREFIX)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
