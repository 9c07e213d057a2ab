"""In a real browser (Debian's chromium, headless, driven by Playwright):

1. the emulator's web view shows a posted thread with a rendered card, and
   hostile text shows literally without running;
2. in JupyterLab on loopback, the composer widget renders, takes typed text,
   sends it, and the message arrives in the emulator.

Screenshots go to ``artifacts/`` (git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.dialogs = []  # every alert/confirm/prompt the page tried to open
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    # nothing but loopback: any other request fails the test
    pg.outside = []

    def route(r):
        host = r.request.url.split("/")[2].rsplit(":", 1)[0] if "://" in r.request.url else ""
        if host in ("127.0.0.1", "localhost", "[::1]") or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            pg.outside.append(r.request.url)
            r.abort()

    pg.route("**/*", route)
    yield pg
    ctx.close()


def shot(pg, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    pg.screenshot(path=str(path), full_page=True)
    return path


# --------------------------------------------------------------------------- 1. the web view

HOSTILE = "<script>alert('text')</script> <img src=x onerror=\"window.__xss=1;alert('img')\"> & \"quotes\""


def test_web_view_shows_thread_card_and_escaped_text(space, page):
    import chat_magic
    from chat_magic.report import FAILED, Report

    key = "browser-thread"
    chat_magic.send("Training *started* on `gpu-01` <https://example.com/run/7|run 7>", thread_key=key)
    chat_magic.send(HOSTILE, thread_key=key)
    report = Report(
        "train.py", status=FAILED, duration=75.3,
        error="ValueError: <img src=x onerror=alert('card')>",
        output="epoch 1 loss 0.5\n<script>alert('output')</script>",
        details={"Host": "gpu-01", "Notebook": "train.ipynb"},
    )
    chat_magic.send(thread_key=key, **report.payload_kwargs())
    assert chat_magic.flush(30)
    msgs = space.messages()
    assert len({m["thread"]["name"] for m in msgs}) == 1

    page.goto(f"{space.emu.base_url}/?space={space.name}")
    main = page.locator("main")
    sync_api.expect(main.locator(".card-title")).to_contain_text("train.py failed in 1 min 15 s")
    assert main.locator(".thread").count() == 1  # one thread: the first message and its replies
    card = main.locator(".card")
    sync_api.expect(card).to_contain_text("ValueError: <img src=x onerror=alert('card')>")
    sync_api.expect(card.locator(".w-label").first).to_have_text("Error")
    sync_api.expect(card).to_contain_text("Notebook")
    sync_api.expect(card.locator("pre")).to_contain_text("<script>alert('output')</script>")
    sync_api.expect(main.locator(".text b").first).to_have_text("started")
    link = main.locator(".text a").first
    sync_api.expect(link).to_have_text("run 7")
    assert link.get_attribute("href") == "https://example.com/run/7"
    assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel")
    # hostile text is shown literally and nothing ran
    texts = main.locator(".text").all_inner_texts()
    assert any(HOSTILE in t for t in texts), texts
    assert main.locator("img").count() == 0 and main.locator("script").count() == 0
    sync_api.expect(main.locator(".meta").first).to_contain_text("requestId cm-")
    sync_api.expect(main.locator(".meta").first).to_contain_text(f"key {key}")

    # live: a new message shows without a reload
    page.evaluate("window.__same_page = true")
    chat_magic.send("a live reply <img src=x onerror=alert('live')>", thread_key=key)
    sync_api.expect(main.locator(".text", has_text="a live reply")).to_be_visible(timeout=15_000)
    assert page.evaluate("window.__same_page") is True
    page.evaluate("window.scrollTo(0, 0)")
    path = shot(page, "webview.png")
    assert path.stat().st_size > 10_000

    assert page.dialogs == []
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.outside == []
    body = page.content()
    from conftest import assert_no_secret

    assert_no_secret(body)


def test_web_view_when_the_emulator_stops(page):
    from chat_magic.emulator import Emulator

    emu = Emulator(qps=None).start()
    try:
        page.goto(emu.base_url + "/")
        sync_api.expect(page.locator("main")).to_contain_text("No messages")
        sync_api.expect(page.locator("#live")).to_have_text("● live", timeout=5_000)
    finally:
        emu.stop()
    sync_api.expect(page.locator("#live")).to_have_text("● offline", timeout=10_000)


# --------------------------------------------------------------------------- 2. JupyterLab


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JUPYTER_CONFIG = """
c.ServerApp.open_browser = False
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"
"""


@pytest.fixture
def jupyter_lab(space, tmp_path):
    """A JupyterLab server on loopback whose kernels post to ``space``; killed at teardown."""
    import requests

    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists() or shutil.which("jupyter-lab", path=str(jupyter.parent)) is None:
        pytest.skip("jupyterlab is not installed in this environment (pip install jupyterlab)")
    root = tmp_path / "lab"
    root.mkdir()
    cfg = tmp_path / "jupyter_config"
    cfg.mkdir()
    (cfg / "jupyter_server_config.py").write_text(JUPYTER_CONFIG)
    (cfg / "labconfig").mkdir()  # no "get Jupyter news?" prompt over the screenshots
    (cfg / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    token = secrets.token_hex(16)
    port = _free_port()
    env = dict(os.environ)
    env.update(
        GOOGLE_CHAT_WEBHOOK_URL=space.url,
        CHAT_MAGIC_HOME=str(tmp_path / "kernel_home"),
        CHAT_MAGIC_CONFIG=str(tmp_path / "no-config.toml"),
        JUPYTER_CONFIG_DIR=str(cfg),
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter_data"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter_runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab_settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab_workspaces"),
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    env.pop("CHAT_MAGIC_THREAD_KEY", None)
    log = open(tmp_path / "jupyter.log", "wb")  # noqa: SIM115 - the server writes to it until the fixture ends
    cmd = [str(jupyter), "lab", "--no-browser", f"--IdentityProvider.token={token}", "--ServerApp.ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI often run as root
    proc = subprocess.Popen(
        cmd,
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"token {token}"}
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/api/status", headers=auth, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not start in 90 s:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"base": base, "token": token, "root": root, "log": tmp_path / "jupyter.log", "auth": auth}
    finally:
        try:  # shut the kernels down, then the server
            for k in requests.get(f"{base}/api/kernels", headers=auth, timeout=5).json():
                requests.delete(f"{base}/api/kernels/{k['id']}", headers=auth, timeout=10)
            requests.post(f"{base}/api/shutdown", headers=auth, timeout=5)
        except Exception:
            pass
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this fixture started
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


def _notebook(source: str) -> dict:
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "composer", "metadata": {},
                   "outputs": [], "source": source}],
        "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def test_composer_in_jupyterlab_sends_to_the_emulator(space, jupyter_lab, page):
    nb = jupyter_lab["root"] / "compose.ipynb"
    nb.write_text(json.dumps(_notebook("from chat_magic import Composer\nc = Composer()\nc")))
    page.set_default_timeout(60_000)
    page.goto(f"{jupyter_lab['base']}/lab/tree/compose.ipynb?token={jupyter_lab['token']}")
    cell = page.locator(".jp-Notebook .jp-Cell").first
    prompt = cell.locator(".jp-InputPrompt")
    # wait until the frontend is connected to an idle kernel (the status bar says
    # "Python 3 (ipykernel) | Idle"): a Shift+Enter before that runs nothing
    try:
        page.wait_for_function(
            "() => [...document.querySelectorAll('#jp-main-statusbar .jp-StatusBar-TextItem')]"
            ".some(e => /\\|\\s*Idle\\s*$/.test(e.textContent))",
            timeout=90_000)
    except sync_api.TimeoutError:
        shot(page, "jupyterlab_kernel_not_idle.png")
        raise AssertionError(f"the kernel did not become idle; server log:\n{jupyter_lab['log'].read_text()[-3000:]}")
    for attempt in range(3):
        cell.locator(".cm-content").click()
        page.keyboard.press("Shift+Enter")
        try:  # "[*]:" while it runs, "[1]:" once done
            sync_api.expect(prompt).to_contain_text(re.compile(r"\[(\*|\d+)\]"), timeout=20_000)
            break
        except AssertionError:
            if attempt == 2:
                shot(page, "jupyterlab_not_run.png")
                raise

    composer = page.locator(".chat-magic-composer")
    try:
        sync_api.expect(composer).to_be_visible(timeout=90_000)
    except AssertionError:
        shot(page, "jupyterlab_no_widget.png")
        raise AssertionError(f"the composer did not render; server log:\n{jupyter_lab['log'].read_text()[-3000:]}")
    send = composer.locator("button", has_text="Send")
    sync_api.expect(send).to_be_disabled()
    typed = "Hello from *JupyterLab* in `chromium` <https://example.com|docs>"
    composer.locator("textarea").click()
    page.keyboard.type(typed)
    sync_api.expect(composer.locator(".cm-bubble b")).to_have_text("JupyterLab")  # the live preview, from the kernel
    sync_api.expect(composer.locator(".cm-bubble a")).to_have_text("docs")
    sync_api.expect(send).to_be_enabled()
    shot(page, "jupyterlab_composer_typed.png")
    send.click()

    msgs = space.wait_for(1, timeout=30)
    deadline = time.monotonic() + 30
    while typed not in "\n\n".join(m.get("text", "") for m in msgs) and time.monotonic() < deadline:
        time.sleep(0.3)
        msgs = space.messages()
    texts = "\n\n".join(m.get("text", "") for m in msgs)
    assert typed in texts  # exactly as typed, through the kernel's outbox and worker
    assert "compose.ipynb" in texts  # the session announced the notebook
    assert len({m["thread"]["name"] for m in msgs}) == 1
    status = composer.locator(".widget-label", has_text="delivered: ")
    sync_api.expect(status).to_have_text(f"delivered: {msgs[-1]['name']}", timeout=30_000)
    sync_api.expect(composer.locator("textarea")).to_have_value("")
    sync_api.expect(composer.locator(".cm-history")).to_contain_text("delivered")
    path = shot(page, "jupyterlab_composer_delivered.png")
    assert path.stat().st_size > 10_000
    # every "Last sends" row stays inside the composer: long parts end in an ellipsis, nothing runs past the edge
    rows = composer.locator(".cm-row").evaluate_all(
        "(rows) => rows.map(r => { const box = r.closest('.chat-magic-composer').getBoundingClientRect();"
        " const b = r.getBoundingClientRect(); return {right: b.right, width: b.width, scroll: r.scrollWidth,"
        " client: r.clientWidth, composer: box.width, composer_right: box.right,"
        " spans: [...r.querySelectorAll('span')].map(s => s.getBoundingClientRect().right),"
        " chain: (() => { const out = []; let e = r; while (e && !e.classList.contains('chat-magic-composer')) {"
        " out.push(e.className + ' ' + Math.round(e.getBoundingClientRect().width) + ' ' + getComputedStyle(e).display"
        " + ' minw=' + getComputedStyle(e).minWidth + ' w=' + getComputedStyle(e).width); e = e.parentElement; } return out; })()}; })")
    assert rows, "the history shows the send"
    for row in rows:
        assert row["width"] <= row["composer"] + 1 and row["right"] <= row["composer_right"] + 1, json.dumps(row)
        assert row["scroll"] <= row["client"] + 1, row  # nothing of the row hidden past its own edge
        assert max(row["spans"]) <= row["composer_right"] + 1, row
    # a long status (a refusal's reason) wraps onto more lines instead of being cut
    long_reason = "failed: " + " ".join(["the-space-refused-the-message"] * 12)
    box = composer.locator(".cm-status").evaluate(
        "(e, text) => { e.textContent = text; const r = e.getBoundingClientRect();"
        " const line = parseFloat(getComputedStyle(e).lineHeight);"
        " return {scroll: e.scrollWidth, client: e.clientWidth, height: r.height, line: line,"
        " right: r.right, parent: e.closest('.chat-magic-composer').getBoundingClientRect().right}; }",
        long_reason,
    )
    assert box["scroll"] <= box["client"] + 1, box  # nothing hidden to the right
    assert box["height"] >= 2 * box["line"] - 1, box  # it took more lines
    assert box["right"] <= box["parent"] + 1, box  # and stayed inside the composer
    sync_api.expect(send).to_have_text(re.compile(r"Send"))  # the button beside it keeps its label
    shot(page, "jupyterlab_composer_long_status.png")
    assert page.dialogs == []
    assert page.outside == [], page.outside
