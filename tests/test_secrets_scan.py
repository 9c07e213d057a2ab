"""Secrets scan: the webhook's key and token leave no trace anywhere.

Scenarios run against the emulator (good deliveries, every fault, refusals,
unreachable servers, redirects, bad URLs, broken config, notices, the CLI, a
notebook in a real kernel), and everything they leave behind is scanned for
the key and the token:

- stdout and stderr (file-descriptor level, worker threads included) and the
  output of every CLI subprocess;
- every log record at DEBUG (root logger, ``chat_magic``, ``urllib3``) and
  every warning;
- exception texts and whole tracebacks (chained exceptions included);
- reprs and strings of ``Receipt``, ``Webhook``, ``Delivered``, the emulator,
  its request records and web page;
- what reached the space (a webhook URL posted into its own space is a leak);
- every column but ``url`` of every outbox file this test session made (``url``
  stores the webhook by design, in a 0600 file);
- saved notebooks.

Also: outbox files are 0600, and a config file others can read draws a warning.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import KEY, TOKEN

import chat_magic
from chat_magic import delivery
from chat_magic.emulator import render_page
from chat_magic.hosts import outbox_path
from chat_magic.webhook import parse_webhook_url

pytestmark = pytest.mark.timeout(180)

NEEDLES = (KEY, TOKEN, KEY[-12:], TOKEN[-12:])  # the tails catch a half-redacted value


class Evidence:
    """Everything a scenario left behind, by where it came from; :meth:`finish` scans it."""

    def __init__(self, caplog, capfd, caught: list) -> None:
        self.items: list[tuple[str, str]] = []
        self._caplog, self._capfd, self._caught = caplog, capfd, caught

    def add(self, where: str, value: object) -> None:
        self.items.append((where, value if isinstance(value, str) else repr(value)))

    def exception(self, where: str, e: BaseException) -> None:
        self.add(f"{where}: str", str(e))
        self.add(f"{where}: repr", repr(e))
        self.add(f"{where}: traceback", "".join(traceback.format_exception(type(e), e, e.__traceback__)))

    def finish(self, *, logs_expected: bool = True) -> None:
        """Collect output, logs and warnings, then assert that no secret is anywhere."""
        out, err = self._capfd.readouterr()
        self.add("stdout", out)
        self.add("stderr", err)
        records = self._caplog.records
        assert records or not logs_expected, "DEBUG logging captured nothing: the scan would prove nothing"
        self.add("log records", "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in records))
        self.add("log text", self._caplog.text)
        for w in self._caught:
            self.add(f"warning {w.category.__name__}", str(w.message))
        leaks = [(where, text[max(0, text.find(n) - 80): text.find(n) + 40])
                 for where, text in self.items for n in NEEDLES if n in text]
        assert not leaks, "secret found in:\n" + "\n".join(f"  {w}: …{t}…" for w, t in leaks[:10])
        assert len(self.items) >= 5, "the scan saw (almost) nothing"


@pytest.fixture
def evidence(caplog, capfd):
    caplog.set_level(logging.DEBUG)  # the root logger
    for name in ("chat_magic", "urllib3", "requests"):
        caplog.set_level(logging.DEBUG, logger=name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield Evidence(caplog, capfd, caught)


def _outbox_rows(path: Path) -> list[dict]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM message")] + [dict(r) for r in db.execute("SELECT * FROM pacing")]
    finally:
        db.close()


def _scan_outbox(ev: Evidence, path: Path) -> int:
    rows = _outbox_rows(path)
    for row in rows:
        row.pop("url", None)  # the webhook itself, by design (0600 file)
        ev.add(f"outbox {path}", json.dumps(row, ensure_ascii=False, default=str))
    return len(rows)


class _Redirect(BaseHTTPRequestHandler):
    """Answers every POST with a redirect to a URL that carries the key and token."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(307)
        self.send_header("Location", f"http://127.0.0.1:1/elsewhere?key={KEY}&token={TOKEN}")
        self.send_header("Content-Length", "0")
        self.end_headers()


# --------------------------------------------------------------------------- in-process


def test_in_process_scenarios_leave_no_secret(space, emulator, evidence, monkeypatch):
    ev = evidence
    saved = (delivery.settings.backoff_base, delivery.settings.backoff_cap, delivery.settings.read_timeout)
    delivery.settings.backoff_base, delivery.settings.backoff_cap, delivery.settings.read_timeout = 0.2, 0.5, 0.5
    try:
        webhook = parse_webhook_url(space.url)
        ev.add("Webhook repr", repr(webhook))
        ev.add("Webhook str", str(webhook))
        ev.add("Webhook space_key", webhook.space_key)

        # every transient fault, then delivery
        for fault in ("503", "reset", "lost_reply"):
            emulator.inject(fault, count=1)
        r = chat_magic.send("through every fault", thread_key="scan")
        got = r.wait(30)
        ev.add("Receipt repr", repr(r))
        ev.add("Receipt destination", r.destination)
        ev.add("Receipt error", str(r.error))
        ev.add("Delivered", repr(got))
        ev.add("results", repr(r.results()))

        # refusals: wrong token, wrong key
        for url in (emulator.webhook_url(space=space.name + "T", key=KEY, token=TOKEN + "x"),
                    emulator.webhook_url(space=space.name + "K", key=KEY + "x", token=TOKEN)):
            bad = chat_magic.send("refused", to=url)
            try:
                bad.wait(10)
            except chat_magic.DeliveryError as e:
                ev.exception("refusal", e)
            else:
                pytest.fail("a wrong key or token was accepted")
            ev.add("refused receipt", repr(bad))
            ev.add("refused receipt error", str(bad.error))

        # nobody listening; a redirect that carries the secret
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            for url in (f"http://127.0.0.1:1/v1/spaces/S/messages?key={KEY}&token={TOKEN}",
                        f"http://127.0.0.1:{server.server_address[1]}/v1/spaces/S/messages?key={KEY}&token={TOKEN}"):
                lost = chat_magic.send("nowhere", to=url)
                try:
                    lost.wait(1)
                except chat_magic.DeliveryError as e:
                    ev.exception("unreachable or redirected", e)
                ev.add("unreachable receipt", repr(lost))
                ev.add("unreachable receipt error", str(lost.error))
        finally:
            server.shutdown()
            server.server_close()

        # a stall past the read timeout
        emulator.inject("stall", count=1, seconds=1.0)
        chat_magic.send("after a stall", thread_key="scan").wait(20)

        # the webhook's own URL in a message (a job printing its environment): posted without key and token
        from urllib.parse import quote

        plain = chat_magic.send(f"GOOGLE_CHAT_WEBHOOK_URL={space.url}", thread_key="scan")
        encoded = chat_magic.send(f"token%3D{quote(TOKEN, safe='')} key={quote(KEY, safe='')}", thread_key="scan")
        for rcpt in (plain, encoded):
            rcpt.wait(20)
        posted = json.dumps(space.messages(), ensure_ascii=False)
        assert f"/spaces/{space.name}/messages?key=…&token=…" in posted

        # user mistakes
        for url in (f"chat.googleapis.com/v1/spaces/A/messages?key={KEY}&token={TOKEN}",
                    f"https://example.com/v1/spaces/A/messages?key={KEY}&token={TOKEN}",
                    f"https://chat.googleapis.com/v1/spaces/A?key={KEY}&token={TOKEN}",
                    f"https://chat.googleapis.com/v1/spaces/A/messages?key={KEY} {TOKEN}",
                    f"key={KEY}&token={TOKEN}"):
            try:
                chat_magic.send("x", to=url)
            except chat_magic.ChatMagicError as e:
                ev.exception("bad URL", e)
            else:
                pytest.fail(f"accepted {url!r}")
        with monkeypatch.context() as m:
            m.setenv("GOOGLE_CHAT_WEBHOOK_URL", f"ftp://chat.googleapis.com/v1/spaces/A/messages?key={KEY}&token={TOKEN}")
            try:
                chat_magic.send("x")
            except chat_magic.ChatMagicError as e:
                ev.exception("bad env URL", e)

        # notices: a job whose exception carries the webhook URL (e.g. a failed request's message)
        with pytest.raises(RuntimeError), chat_magic.notify_when_done("leaky job") as n:
            n.update("step 1")
            raise RuntimeError(f"could not reach {os.environ['GOOGLE_CHAT_WEBHOOK_URL']}")
        ev.add("notify repr", repr(n))
        assert n.receipt is not None
        n.receipt.wait(30)

        # what reached the space, and what the emulator recorded and shows
        msgs = space.messages()
        assert any("leaky job" in json.dumps(m, ensure_ascii=False) for m in msgs)
        ev.add("space messages", json.dumps(msgs, ensure_ascii=False))
        ev.add("emulator repr", repr(emulator))
        ev.add("emulator requests (whole session)", json.dumps(emulator.requests, ensure_ascii=False))
        ev.add("emulator stats", json.dumps(emulator.stats()))
        ev.add("emulator page", render_page(emulator._page_state()))

        # the outbox: every column but url
        assert _scan_outbox(ev, delivery.dispatcher().outbox.path) >= 5
        ev.finish()
    finally:
        delivery.settings.backoff_base, delivery.settings.backoff_cap, delivery.settings.read_timeout = saved


# --------------------------------------------------------------------------- CLI


def _cli(*args: str, env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat_magic.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=90)


@pytest.mark.slow
def test_cli_scenarios_leave_no_secret(space, emulator, evidence, outbox_home, tmp_path):
    ev = evidence
    env = dict(os.environ)
    wrong = dict(env, GOOGLE_CHAT_WEBHOOK_URL=emulator.webhook_url(space=space.name, key=KEY, token=TOKEN + "x"))
    nowhere = dict(env, GOOGLE_CHAT_WEBHOOK_URL=f"http://127.0.0.1:1/v1/spaces/S/messages?key={KEY}&token={TOKEN}",
                   CHAT_MAGIC_EXIT_TIMEOUT="0")
    broken = dict(env, GOOGLE_CHAT_WEBHOOK_URL=f"https://chat.googleapis.com/v1/spaces/S?key={KEY}&token={TOKEN}")
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[spaces.team]\nwebhook_url = "https://chat.googleapis.com/v1/spaces/S/messages?key={KEY}&token={TOKEN}\n')
    cfg.chmod(0o600)
    bad_config = dict(env, CHAT_MAGIC_CONFIG=str(cfg))
    emulator.inject("503", count=1)
    emulator.inject("lost_reply", count=1)
    runs = [
        ("send ok", ["send", "from the CLI", "--thread", "cli"], env, None, 0),
        ("send stdin", ["send", "-"], env, "line 1\nline 2\n", 0),
        ("send refused", ["send", "refused"], wrong, None, 1),
        ("send unreachable", ["send", "unreachable", "--timeout", "1"], nowhere, None, 1),
        ("send bad URL", ["send", "x"], broken, None, 2),
        ("send --to URL without scheme", ["send", "x", "--to", f"chat.googleapis.com/v1/spaces/S/messages?key={KEY}&token={TOKEN}"], env, None, 2),
        ("send bad config", ["send", "x", "--to", "team"], bad_config, None, 2),
        ("outbox list", ["outbox", "list", "--all"], env, None, 0),
        ("outbox retry", ["outbox", "retry", "--all", "--timeout", "1"], env, None, None),
        ("outbox list again", ["outbox", "list", "--all"], env, None, 0),
        ("outbox flush", ["outbox", "flush", "--timeout", "1"], env, None, None),
        ("run", ["run", "--", sys.executable, "-c", "import os, sys; print(os.environ['GOOGLE_CHAT_WEBHOOK_URL']); sys.exit(3)"], env, None, 3),
    ]
    first, rest = runs[:7], runs[7:]  # the sends are independent; the outbox commands come after them, in order
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda r: _cli(*r[1], env=r[2], stdin=r[3]), first))
    done += [_cli(*r[1], env=r[2], stdin=r[3]) for r in rest]
    for (name, _args, _e, _stdin, code), out in zip(runs, done):
        if code is not None:
            assert out.returncode == code, (name, out.returncode, out.stderr[-500:])
        if name == "run":
            # the command itself printed the URL: that output is the user's own, passed through;
            # only what chat_magic says on stderr is scanned here (what it posted is scanned below)
            ev.add(f"cli {name} stderr", out.stderr)
        else:
            ev.add(f"cli {name} stdout", out.stdout)
            ev.add(f"cli {name} stderr", out.stderr)
    ev.add("space messages", json.dumps(space.messages(), ensure_ascii=False))
    assert any("from the CLI" in json.dumps(m) for m in space.messages())
    assert _scan_outbox(ev, outbox_path(outbox_home)) >= 3
    ev.finish(logs_expected=False)  # the logging happened in the subprocesses; their output is scanned


# --------------------------------------------------------------------------- notebooks


NOTEBOOK_CELLS = [
    "%load_ext chat_magic",
    "%%chat --title Train\nprint('epoch 1: loss 0.5')\n42",
    "%%chat --title Broken\nimport os\nraise ValueError('bad value')",
    "%chat hello from the notebook",
    "%chat --to nowhere x",
    "import os, chat_magic\nwrong = os.environ['GOOGLE_CHAT_WEBHOOK_URL'].replace('token=', 'token=x')\nr = chat_magic.send('refused', to=wrong)\nr",
    "r.wait(10)",
    "chat_magic.send('x', to=wrong.replace('/messages', ''))",
    "import logging; logging.basicConfig(level=logging.DEBUG, force=True)\nchat_magic.send('logged at debug').wait(10)",
    "chat_magic.flush(20)",
]


@pytest.mark.slow
def test_saved_notebook_carries_no_secret(space, evidence, tmp_path, tmp_path_factory, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    ev = evidence
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    monkeypatch.setenv("CHAT_MAGIC_EXIT_TIMEOUT", "10")
    NotebookClient(nb, kernel_name="python3", timeout=60, allow_errors=True).execute()
    path = tmp_path / "executed.ipynb"
    nbformat.write(nb, path)
    outputs = [o for c in nb.cells for o in c.outputs]
    kinds = {o.output_type for o in outputs}
    assert "error" in kinds and ("stream" in kinds or "execute_result" in kinds), kinds
    text = path.read_text(encoding="utf-8")
    assert "DeliveryFailed" in text and "permission denied" in text, "the scenario failed as intended"
    ev.add(f"notebook {path}", text)
    # and any notebook another test of this session saved
    for other in tmp_path_factory.getbasetemp().rglob("*.ipynb"):
        if other != path:
            nbo = nbformat.read(other, as_version=4)
            ev.add(f"notebook {other}", json.dumps([c.get("outputs", []) for c in nbo.cells]) + json.dumps(nbo.metadata))
    ev.add("space messages", json.dumps(space.messages(), ensure_ascii=False))
    assert any("Train" in json.dumps(m, ensure_ascii=False) for m in space.messages())
    ev.finish(logs_expected=False)


# --------------------------------------------------------------------------- files


def test_every_outbox_of_the_session_is_private_and_secret_free(space, evidence, tmp_path_factory):
    ev = evidence
    chat_magic.send("make sure there is one", thread_key="files").wait(10)
    root = tmp_path_factory.getbasetemp()  # this session's: every test's outbox so far
    boxes = sorted(p for p in root.rglob("outbox*.sqlite3") if p.is_file())
    assert boxes
    scanned = 0
    for box in boxes:
        for f in [box] + [box.with_name(box.name + s) for s in ("-wal", "-shm")]:
            if f.exists():
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f} is {oct(stat.S_IMODE(f.stat().st_mode))}"
        try:
            scanned += _scan_outbox(ev, box)
        except sqlite3.DatabaseError:
            pass  # a test's deliberately corrupted outbox
    assert scanned
    ev.finish()


@pytest.mark.parametrize("mode, warns", [(0o600, False), (0o400, False), (0o640, True), (0o604, True), (0o644, True), (0o660, True)])
def test_config_readable_by_others_warns(space, tmp_path, monkeypatch, mode, warns):
    cfg = tmp_path / f"config-{mode:o}.toml"
    cfg.write_text(f'[spaces.team]\nwebhook_url = "{space.url}"\n')
    cfg.chmod(mode)
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chat_magic.send("x", to="team").wait(10)
    ours = [w for w in caught if "chat_magic" in str(w.message)]
    if warns:
        assert len(ours) == 1 and "chmod 600" in str(ours[0].message) and str(cfg) in str(ours[0].message)
        for n in NEEDLES:
            assert n not in str(ours[0].message)
    else:
        assert not ours, [str(w.message) for w in ours]


def test_config_readable_by_others_warns_in_the_cli(space, tmp_path):
    cfg = tmp_path / "open.toml"
    cfg.write_text(f'[spaces.team]\nwebhook_url = "{space.url}"\n')
    cfg.chmod(0o644)
    out = _cli("send", "from an open config", "--to", "team", env=dict(os.environ, CHAT_MAGIC_CONFIG=str(cfg)))
    assert out.returncode == 0, out.stderr
    assert "chmod 600" in out.stderr and str(cfg) in out.stderr
    warning = [ln for ln in out.stderr.splitlines() if "chmod 600" in ln]
    assert len(warning) == 1 and warning[0].startswith("chat-magic: warning: "), out.stderr  # one line, no source echo
    assert "warnings.warn" not in out.stderr
    for n in NEEDLES:
        assert n not in out.stdout + out.stderr
    assert space.texts() == ["from an open config"]


# --------------------------------------------------------------------------- odd URLs, verbose tracebacks, cuts (issue 10)

def _encodings(secret: str) -> list[str]:
    """The secret as the URL parser would accept it: raw, percent-encoded (both cases), and its tail."""
    enc = "".join(f"%{ord(c):02X}" for c in secret)
    return [secret, enc, enc.lower(), quote(secret, safe=""), secret[-12:]]


ODD_NEEDLES = tuple(n for s in (KEY, TOKEN) for n in _encodings(s))


def _leaks(text: str, needles: tuple[str, ...] = ODD_NEEDLES) -> list[str]:
    return [n for n in needles if n in text]


def test_percent_encoded_names_fragments_and_quotes_never_show(space, emulator, evidence, monkeypatch, shell):
    """``?%6Bey=KEY&%74oken=TOKEN#key=KEY`` is one canonical webhook; nothing shows its secrets in any encoding."""
    ev = evidence
    base = space.url.split("?")[0]
    odd = f"{base}?%6Bey={KEY}&%74oken={TOKEN}#key={KEY}&token={TOKEN}"
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", odd)
    hook = parse_webhook_url(odd)
    r = chat_magic.send("through an odd spelling", thread_key="odd")
    r.wait(20)
    n = chat_magic.notify_when_done("odd job")
    with n:
        pass
    n.receipt.wait(20)
    for what, value in (("Webhook repr", repr(hook)), ("Webhook str", str(hook)), ("Receipt", repr(r)),
                        ("notify repr", repr(n)), ("destination", r.destination)):
        ev.add(what, value)
    ip = shell
    ip.user_ns["r"], ip.user_ns["hook"] = r, hook
    for cell in ("r", "hook", "print(r, hook)", "[hook]", "{'h': hook}"):
        result = ip.run_cell(cell, store_history=True)
        ev.add(f"Out[] {cell}", repr(result.result))
    # quotes and parentheses inside the values, and the non-loopback http refusal, in any encoding
    for key, token in ((f"q'{KEY}", f"p){TOKEN}"), (KEY, TOKEN)):
        for url in (f"http://chat.googleapis.com/v1/spaces/S/messages?%6Bey={quote(key)}&%74oken={quote(token)}",
                    f"http://10.0.0.1/v1/spaces/S/messages?key={key}&token={token}#{key}",
                    f"https://chat.googleapis.com/v1/spaces/S/messages?%6Bey={key}&%6Bey={key}&token={token}",
                    f"http://127.0.0.1:1/v1/spaces/S/messages?key={key}&token={token}&x=')"):
            try:
                w = parse_webhook_url(url)
            except chat_magic.WebhookURLError as e:
                ev.exception("refused odd URL", e)
                assert "\n" not in str(e)
            else:
                ev.add("odd Webhook", repr(w) + str(w) + w.redacted)
    out, err = ev._capfd.readouterr()
    ev.add("stdout", out)
    ev.add("stderr", err)
    leaks = [(where, _leaks(text)) for where, text in ev.items if _leaks(text)]
    assert not leaks, leaks
    posted = json.dumps(space.messages(), ensure_ascii=False)
    assert "through an odd spelling" in posted and not _leaks(posted)
    ev.finish()
    assert hook == parse_webhook_url(space.url) and hook.id == parse_webhook_url(space.url).id, "one canonical webhook"


@pytest.mark.slow
def test_verbose_traceback_of_a_locked_outbox_shows_no_secret(space, outbox_home, capfd, monkeypatch, tmp_path, shell):
    """``%xmode Verbose`` prints every frame's arguments and the values in its line: none may be the URL."""
    odd = space.url.split("?")[0] + f"?%6Bey={KEY}&%74oken={TOKEN}"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[spaces.team]\nwebhook_url = "{space.url}"\n')
    cfg.chmod(0o600)
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(cfg))
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", odd)
    chat_magic.send("opens the outbox").wait(10)
    path = delivery.dispatcher().outbox.path
    locker = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)\n"
        "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(8); db.execute('COMMIT')\n"), str(path)],
        stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    ip = shell
    try:
        ip.run_line_magic("xmode", "Verbose")
        capfd.readouterr()
        results = [ip.run_cell("import chat_magic\nchat_magic.send('locked out')", store_history=True),
                   ip.run_cell("chat_magic.send('locked out', to='team')", store_history=True)]
        out, err = capfd.readouterr()
        # what the user sees is the error's one line; the whole verbose traceback (every frame's
        # arguments and locals) is what %tb, a debugger or a bug report would show: neither leaks
        verbose = []
        for r in results:
            e = r.error_in_exec
            assert type(e).__name__ == "OutboxError", r
            verbose += ip.InteractiveTB.structured_traceback(type(e), e, e.__traceback__)
    finally:
        ip.run_line_magic("xmode", "Context")
        locker.wait(30)
    shown = out + err
    assert shown.count("OutboxError") >= 2 and "locked" in shown, shown[-2000:]
    assert len([ln for ln in shown.splitlines() if ln.strip()]) == 2, shown  # one line each
    full = "\n".join(verbose)
    assert "webhook" in full, "the verbose traceback did show variables (else this proves nothing)"
    assert not _leaks(full), [(n, full[full.find(n) - 200: full.find(n) + 50]) for n in _leaks(full)]
    assert not _leaks(shown), [(n, shown[shown.find(n) - 200: shown.find(n) + 50]) for n in _leaks(shown)]


def _fragments(text: str, min_len: int = 6) -> list[str]:
    """Pieces (at least ``min_len`` characters) of the key or token found in ``text``."""
    found = []
    for s in (KEY, TOKEN):
        for i in range(len(s) - min_len + 1):
            if s[i:i + min_len] in text:
                found.append(s[i:i + min_len])
    return found


def _secret_span(url: str) -> range:
    """Offsets in ``url`` from the first character of the key to the last of the token."""
    return range(url.index(KEY) - 1, url.index(TOKEN) + len(TOKEN) + 1)


def test_a_cut_at_every_offset_across_key_and_token_leaves_no_fragment(outbox_home, monkeypatch):
    """Split and truncate, with the cut at each offset from before the key to after the token.

    The messages go to a port where nobody listens; what the outbox stores is what would be posted.
    """
    from chat_magic.message import split_text

    url = f"http://127.0.0.1:1/v1/spaces/CUT/messages?key={KEY}&token={TOKEN}"
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", url)
    monkeypatch.setattr(delivery.settings, "backoff_base", 300.0)
    monkeypatch.setattr(delivery.settings, "backoff_cap", 300.0)
    first = len(split_text("x" * 9000)[0])  # where a text without spaces or line ends is cut
    sent = 0
    for offset in _secret_span(url):
        text = "x" * (first - offset) + url + "y" * 5000
        for truncate in (False, True):
            r = chat_magic.send(text, truncate=truncate, thread_key=f"cut-{offset}-{truncate}")
            assert len(r.ids) >= 2 or truncate
            sent += 1
    rows = _outbox_rows(delivery.dispatcher().outbox.path)
    bodies = [r["payload"] for r in rows if "payload" in r]
    assert len(bodies) >= sent * 1.5
    for body in bodies:
        assert not _fragments(json.loads(body)["text"]), (_fragments(json.loads(body)["text"]), body[:200])


def test_chat_output_tail_and_run_labels_cut_across_the_secret_leave_no_fragment(space, outbox_home, monkeypatch, shell):
    """%%chat's output tail and ``chat-magic run``'s shortened label, cut at every offset across key and token."""
    from chat_magic import run as run_cli

    url = space.url
    ip = shell
    ip.run_cell("%load_ext chat_magic")
    try:
        ip.run_cell("%config ChatMagics.max_chars = 3000")
        ip.run_cell("%config ChatMagics.cards = False")
        for offset in _secret_span(url):
            # the tail keeps the last 3,000 characters: make it start at `offset` within the URL
            pad = 3000 + offset - len(url) - 1
            ip.run_cell(f"%%chat --title tail-{offset}\nimport os\nprint(os.environ['GOOGLE_CHAT_WEBHOOK_URL'] + 'y' * {pad})")
    finally:
        ip.run_cell("%unload_ext chat_magic")
        ip.config.pop("ChatMagics", None)
    for offset in _secret_span(url):
        # the label is the command line cut at 60 characters
        pad = max(1, 59 - len("echo  ") - offset)
        run_cli.main(["--no-cards", "--wait", "0", "--", "echo", "a" * pad, url])
    box = delivery.dispatcher().outbox.path
    payloads = [r["payload"] for r in _outbox_rows(box) if "payload" in r]
    assert len(payloads) >= 2 * len(_secret_span(url))
    for body in payloads:
        assert not _fragments(body), (_fragments(body), body[:300])


# --------------------------------------------------------------------------- echoed in another spelling (issue 16)

# A Google-shaped key and a token with characters that every encoder touches ("=", "/", "+")
ECHO_KEY = "AIzaSyC7Qp2Lm9Vb4Nc8Tg1Rk5Wj3Hd6Fs0Ya2U"
ECHO_TOKEN = "Zx9-Q_Lm3/Vb7+Nc2=Tg8Rk5Wj3Hd6Fs0=="


def _echo_spellings(v: str) -> dict[str, str]:
    """How a server's stack may echo a secret: the 7+ spellings a scrubber must know."""
    import html

    pct = "".join(f"%{ord(c):02X}" for c in v)
    return {
        "raw": v,
        "percent once": pct,
        "percent once, as quote() writes it": quote(v, safe=""),
        "percent twice": quote(pct, safe=""),
        "HTML decimal entities": "".join(f"&#{ord(c)};" for c in v),
        "HTML hex entities": "".join(f"&#x{ord(c):x};" for c in v),
        "HTML named entities": v.replace("=", "&equals;").replace("/", "&sol;").replace("+", "&plus;"),
        "html.escape": html.escape(v),
        "JSON \\u escapes": "".join(f"\\u{ord(c):04x}" for c in v),
        "JSON ensure_ascii": json.dumps(v)[1:-1],
    }


def _echo_bodies() -> list[tuple[int, str, bytes]]:
    """Error replies echoing the key (400) and the token (403) in each spelling, in JSON, HTML, plain text and prose."""
    out = []
    for name, spelled in _echo_spellings(ECHO_KEY).items():
        body = {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                          "message": f"API key {spelled} not valid ({name}). Please pass a valid API key.",
                          "details": [{"reason": "API_KEY_INVALID"}]}}
        out.append((400, "application/json", json.dumps(body).encode()))
    for name, spelled in _echo_spellings(ECHO_TOKEN).items():
        page = f"<html><body><h1>403 Forbidden</h1><p>token&#61;{spelled} ({name}) refused</p></body></html>"
        out.append((403, "text/html", page.encode()))
    # the whole request URL echoed: key= and token= with "=" and "&" escaped as Go's JSON or HTML would
    q = f"key\\u003d{ECHO_KEY}\\u0026token\\u003d{quote(ECHO_TOKEN, safe='')}"
    out.append((400, "application/json", json.dumps({"error": {"message": f"bad request to /v1/spaces/X/messages?{q}",
                                                                "status": f"INVALID_ARGUMENT key={ECHO_KEY}"}}).encode()))
    out.append((403, "text/plain", f'{{"key": "{ECHO_KEY}", "token": "{ECHO_TOKEN}"}} refused'.encode()))
    out.append((403, "text/plain", ("x" * 5000 + f" token {ECHO_TOKEN} " + "y" * 5000).encode()))  # long: capped
    return out


class _Echo(BaseHTTPRequestHandler):
    """Refuses each space's message with the body of ``_echo_bodies()[space number]``, as a careless server would."""

    protocol_version = "HTTP/1.1"
    bodies = _echo_bodies()

    def log_message(self, *args):
        pass

    def do_POST(self):
        from conftest import validate_message

        validate_message(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8"))
        n = int(self.path.split("/spaces/E")[1].split("/")[0])
        code, kind, body = self.bodies[n]
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _echo_needles() -> tuple[str, ...]:
    """Every spelling of both secrets, and the head and tail of each (a half-scrubbed value leaks too)."""
    out = set()
    for v in (ECHO_KEY, ECHO_TOKEN):
        for spelled in _echo_spellings(v).values():
            out.update({spelled, spelled[:16], spelled[-16:]})
        out.update({v[:12], v[-12:]})
    return tuple(out)


def test_secrets_echoed_in_any_spelling_never_stored_nor_shown(outbox_home, evidence, monkeypatch):
    ev = evidence
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    monkeypatch.setattr(delivery.settings, "interval", 0.0)
    monkeypatch.setattr(delivery.settings, "gap_after_answer", 0.0)
    try:
        receipts = [chat_magic.send(f"echo {n}", to=f"http://127.0.0.1:{port}/v1/spaces/E{n}/messages"
                                                   f"?key={ECHO_KEY}&token={quote(ECHO_TOKEN, safe='')}")
                    for n in range(len(_Echo.bodies))]
        for r in receipts:
            with pytest.raises(chat_magic.DeliveryFailed) as e:
                r.wait(30)
            assert e.value.code in (400, 403) and "\n" not in str(e.value)
            assert len(str(e.value)) <= 2200, "a stored error is capped"
            ev.exception("refusal", e.value)
            ev.add("DeliveryFailed status", e.value.status)
            ev.add("Receipt.error", str(r.error))
            ev.add("Receipt repr", repr(r))
        assert any("key is not valid" in str(r.error) for r in receipts)
        box = delivery.dispatcher().outbox.path
        rows = _outbox_rows(box)
        for row in rows:
            row.pop("url", None)
            ev.add("stored row", json.dumps(row, ensure_ascii=False, default=str))
        for args in (["outbox", "list"], ["outbox", "list", "--all-hosts"]):
            out = _cli(*args, env=dict(os.environ))
            assert out.returncode == 0 and "failed" in out.stdout, out.stderr
            ev.add(f"chat-magic {' '.join(args)}", out.stdout + out.stderr)
    finally:
        server.shutdown()
        server.server_close()
    ev.finish()  # the conftest secrets, as everywhere
    texts = "\n".join(text for _, text in ev.items)
    leaks = [n for n in _echo_needles() if n in texts]
    assert not leaks, f"echoed secret found in some spelling: {leaks[:5]}"


def test_a_webhook_and_notify_when_done_pickle_yaml_and_copy_without_secrets(outbox_home, tmp_path, monkeypatch):
    import copy
    import pickle

    import yaml

    url = f"http://127.0.0.1:1/v1/spaces/P/messages?key={ECHO_KEY}&token={quote(ECHO_TOKEN, safe='')}"
    hook = parse_webhook_url(url)
    n_url = chat_magic.notify_when_done("job", to=url)
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", url)
    n_default = chat_magic.notify_when_done("job")
    needles = _echo_needles()
    for obj in (hook, n_url, n_default):
        dumped = [pickle.dumps(obj, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
        shown = [d.decode("latin-1") for d in dumped] + [yaml.dump(obj), repr(vars(obj)) if hasattr(obj, "__dict__") else ""]
        assert not [n for n in needles for s in shown if n in s], f"{type(obj).__name__} shows its secret"
        again = pickle.loads(dumped[-1])
        assert copy.copy(obj) is obj or copy.copy(obj).webhook == hook
        assert (again if isinstance(obj, type(hook)) else again.webhook) == hook  # this process knows it
        assert (copy.deepcopy(obj) if isinstance(obj, type(hook)) else copy.deepcopy(obj).webhook) == hook
    # another process: found again through its configuration, else a one-line error when used
    blob = tmp_path / "hook.pickle"
    blob.write_bytes(pickle.dumps(hook))
    code = ("import pickle, sys, chat_magic; h = pickle.load(open(sys.argv[1], 'rb'))\n"
            "try:\n    chat_magic.send('x', to=h); print('queued', h.id)\n"
            "except chat_magic.ChatMagicError as e:\n    print('refused:', e)\n")
    env = dict(os.environ, CHAT_MAGIC_EXIT_TIMEOUT="0")
    known = subprocess.run([sys.executable, "-c", code, str(blob)], env=env, capture_output=True, text=True, timeout=60)
    assert known.stdout.strip() == f"queued {hook.id}", known.stderr
    env.pop("GOOGLE_CHAT_WEBHOOK_URL")
    env["CHAT_MAGIC_HOME"] = str(tmp_path / "elsewhere")
    unknown = subprocess.run([sys.executable, "-c", code, str(blob)], env=env, capture_output=True, text=True, timeout=60)
    assert unknown.stdout.startswith("refused: this webhook was unpickled") and unknown.stdout.count("\n") == 1, unknown
    assert "Traceback" not in unknown.stderr
