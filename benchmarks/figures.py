#!/usr/bin/env python
"""What a figure costs the caller of ``%%chat`` (issue 18), side by side in one run.

    python benchmarks/figures.py [--runs 20] [--out benchmarks/figures_results.md]

A real IPython ``InteractiveShell`` with matplotlib's inline backend, the
local emulator (real HTTP on loopback) and a folder image store served by
``http.server``. Four cells, each run ``--runs`` times, interleaved:

- ``plot``        ``plt.plot(...)`` (the inline backend renders and displays the PNG)
- ``%%chat plot`` the same under ``%%chat`` (the figure is posted)
- ``text``        ``print(...)``
- ``%%chat text`` the same under ``%%chat``

The caller's cost is the wall time of ``run_cell``; the upload and the POST
happen in the worker thread, so they are not in it (the time until the
notice is in the space is measured separately). Prints a markdown table and
writes it to ``--out`` with the date and the machine.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "figures_results.md"))
    args = parser.parse_args()

    from chat_magic.emulator import Emulator

    emu = Emulator(key="k" * 30, token="t" * 30, qps=None, strict=True).start()
    home = Path(tempfile.mkdtemp(prefix="cm-bench-"))
    www = home / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    os.environ.update({
        "CHAT_MAGIC_HOME": str(home / "state"), "CHAT_MAGIC_CONFIG": str(home / "none.toml"),
        "GOOGLE_CHAT_WEBHOOK_URL": emu.webhook_url(space="BENCH", key="k" * 30, token="t" * 30),
        "CHAT_MAGIC_IMAGE_STORE": f"file://{www}", "CHAT_MAGIC_IMAGE_BASE_URL": f"http://127.0.0.1:{httpd.server_address[1]}/",
    })
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    import chat_magic

    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=cfg)
    shell.run_cell("%load_ext chat_magic")
    from IPython.core.pylabtools import activate_matplotlib
    from matplotlib_inline.backend_inline import configure_inline_support

    activate_matplotlib("module://matplotlib_inline.backend_inline")  # what a notebook's kernel uses (%matplotlib inline)
    configure_inline_support(shell, "module://matplotlib_inline.backend_inline")
    assert shell.run_cell("import matplotlib.pyplot as plt\nimport random").success
    shell.display_pub.publish = lambda *a, **k: None  # the terminal prints nothing; the capture still sees each display
    cells = {
        "plot": "plt.plot([random.random() for _ in range(50)])\nplt.title('run');",
        "%%chat plot": "%%chat --title bench\nplt.plot([random.random() for _ in range(50)])\nplt.title('run');",
        "text": "print('epoch done', random.random())",
        "%%chat text": "%%chat --title bench\nprint('epoch done', random.random())",
    }
    for source in cells.values():  # warm up: imports, the first figure, the session header
        shell.run_cell(source, store_history=True)
    if not chat_magic.flush(60):
        from chat_magic.delivery import dispatcher

        print([(r.state, r.error) for r in dispatcher().outbox.rows()][:5], file=sys.stderr)
    times: dict[str, list[float]] = {k: [] for k in cells}
    for _ in range(args.runs):
        for name, source in cells.items():
            t0 = time.perf_counter()
            shell.run_cell(source, store_history=True)
            times[name].append(time.perf_counter() - t0)
    ok = chat_magic.flush(300)  # the cells' notices, paced at one request per 1.1 s
    fresh = www / "fresh.png"
    fresh.write_bytes(next(p for p in www.iterdir() if p.suffix == ".png").read_bytes()[:-12] + b"\0" * 12)  # new bytes: a real upload
    t0 = time.perf_counter()
    r = chat_magic.send("one more figure", image=fresh)
    queued = time.perf_counter() - t0
    r.wait(60)
    one_send = time.perf_counter() - t0
    posted = sum(1 for m in emu.messages(space="BENCH") for c in m.get("cardsV2") or [] for s in c["card"]["sections"]
                 for w in s["widgets"] if "image" in w)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    ratio = med["%%chat plot"] / med["%%chat text"]
    magic_plot, magic_text = med["%%chat plot"] - med["plot"], med["%%chat text"] - med["text"]
    lines = [
        f"## Figures: caller's cost of a `%%chat` cell ({datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} cores, {args.runs} runs each, medians)",
        "",
        "| cell | median ms |",
        "|---|---|",
        *[f"| `{k}` | {v:.1f} |" for k, v in med.items()],
        "",
        f"- **a `%%chat` cell with a figure costs the caller {med['%%chat plot'] / med['plot']:.2f}× the same cell without "
        f"`%%chat`** (matplotlib drawing the figure dominates both); vs a `%%chat` cell without a figure: {ratio:.0f}×",
        f"- what `%%chat` adds to the cell: {magic_plot:.1f} ms with a figure (capture, hash, the PNG written to the outbox) vs "
        f"{magic_text:.1f} ms without",
        f"- upload and POST run in the worker: `send(image=path)` returned in {queued * 1000:.1f} ms, delivered (uploaded, then "
        f"posted) {one_send * 1000:.0f} ms after; {posted} figures in the space, everything delivered: {ok}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    httpd.shutdown()
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
