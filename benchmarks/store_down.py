#!/usr/bin/env python
"""How long a store that does not answer holds a notice and its space (issue 18 follow-up), side by side in one run.

    python benchmarks/store_down.py [--out benchmarks/store_down_results.md]

The local emulator (real HTTP on loopback), default delivery settings
(pacing, backoff) and default patience (3 upload attempts or 2 minutes).
Three stores, each for one notice with a figure followed by a plain notice to
the same space:

- ``folder``  a folder served by ``http.server`` (healthy)
- ``refused`` an S3 endpoint whose port is closed (connection refused)
- ``silent``  an S3 endpoint that accepts connections and never answers

For each: seconds until the figure's notice is in the space, and until the
plain notice behind it is. Also the time one upload attempt (``images.upload``)
holds the space's lane for a silent S3 and a silent GCS endpoint.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import io
import os
import platform
import socket
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


def _silent() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    kept: list[socket.socket] = []

    def accept() -> None:
        while True:
            conn, _ = sock.accept()
            kept.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1]


def _closed() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 120), (seed * 40 % 256, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "store_down_results.md"))
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
        "AWS_ACCESS_KEY_ID": "AKIABENCH", "AWS_SECRET_ACCESS_KEY": "b" * 40, "AWS_DEFAULT_REGION": "us-east-1",
    })
    os.environ.pop("CHAT_MAGIC_IMAGE_PATIENCE", None)
    import chat_magic
    from chat_magic import images

    stores = {
        "folder": {"CHAT_MAGIC_IMAGE_STORE": f"file://{www}", "CHAT_MAGIC_IMAGE_BASE_URL": f"http://127.0.0.1:{httpd.server_address[1]}/"},
        "refused": {"CHAT_MAGIC_IMAGE_STORE": "s3://bench/figs", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed()}"},
        "silent": {"CHAT_MAGIC_IMAGE_STORE": "s3://bench/figs", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_silent()}"},
    }
    chat_magic.send("warm up").wait(30)
    rows = []
    for i, (name, env) in enumerate(stores.items()):
        os.environ.pop("CHAT_MAGIC_IMAGE_BASE_URL", None)
        os.environ.update(env)
        images._stores.clear()
        t0 = time.perf_counter()
        first = chat_magic.send(f"{name}: with a figure", image=_png(i))
        after = chat_magic.send(f"{name}: the notice behind it")
        first.wait(600)
        t_first = time.perf_counter() - t0
        after.wait(600)
        t_after = time.perf_counter() - t0
        rows.append((name, t_first, t_after))

    attempts = []
    data = _png(9)
    for kind in ("s3", "gs"):
        port = _silent()
        if kind == "s3":
            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        images._stores.clear()
        t0 = time.perf_counter()
        try:
            images.upload(images.StoreSpec(kind, "bench", "figs"), [(hashlib.sha256(data).hexdigest(), images.PNG, data)])
        except images.StoreError:
            pass
        attempts.append((kind, time.perf_counter() - t0))

    was = {"s3": "90 s (30 s read timeout x 3 tries)", "gs": "120 s (its retry deadline)"}
    lines = [
        f"## A store that does not answer ({datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} cores, default settings, one run each)",
        "",
        "| store | figure's notice posted after s | the notice behind it after s |",
        "|---|---|---|",
        *[f"| {n} | {a:.1f} | {b:.1f} |" for n, a, b in rows],
        "",
        f"- a refused store delays the notice {rows[1][1] / rows[0][1]:.0f}× a healthy one's time; a silent one "
        f"{rows[2][1] / rows[0][1]:.0f}× (was: until the 24 h retry window ran out, the space's queue behind it)",
        *[f"- one upload attempt to a silent {k} endpoint held the space's lane {t:.1f} s (was {was[k]}: past the 35 s lease)"
          for k, t in attempts],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    httpd.shutdown()
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
