"""A loopback webhook server answering from a script: the replies the emulator does not make.

``Retry-After``, 404, 413, redirects, a proxy's HTML page, an empty 200, a 200 MB body: each
scripted reply is ``(status, headers, body)``, where ``body`` is text, bytes, or an int (that
many bytes of filler, written until the client hangs up); after the script, it answers as
Google does (a JSON message). Every request body is checked with the official proto.
Tests get one through the ``replies`` fixture (``tests/conftest.py``), which closes it.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

from conftest import KEY, TOKEN, validate_message


class Hit(NamedTuple):
    at: float  # time.monotonic() on arrival
    path: str
    body: str


class Replies:
    """The server; ``hits`` are the requests it received, ``written`` the bytes of each big body sent before the client closed."""

    def __init__(self, script: list[tuple[int, dict, str | bytes | int]]):
        self.script = list(script)
        self.hits: list[Hit] = []
        self.written: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # request lines carry the key and token
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8")
                validate_message(body)
                outer.hits.append(Hit(time.monotonic(), self.path, body))
                status, headers, reply = outer.script.pop(0) if outer.script else outer.google_reply()
                if isinstance(reply, str):
                    reply = reply.encode("utf-8")
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(reply if isinstance(reply, int) else len(reply)))
                self.end_headers()
                if isinstance(reply, int):
                    self._flood(reply)
                else:
                    self.wfile.write(reply)

            def _flood(self, size: int) -> None:
                chunk, sent = b"<p>" + b"x" * (64 * 1024 - 3), 0
                try:
                    while sent < size:
                        self.wfile.write(chunk)
                        sent += len(chunk)
                except OSError:
                    pass
                finally:
                    outer.written.append(sent)
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def google_reply(self) -> tuple[int, dict, bytes]:
        n = len(self.hits)
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"name": f"spaces/STUB/messages/m{n}", "thread": {"name": "spaces/STUB/threads/t"}}).encode()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, space: str = "STUB") -> str:
        return f"http://127.0.0.1:{self.port}/v1/spaces/{space}/messages?key={KEY}&token={TOKEN}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
