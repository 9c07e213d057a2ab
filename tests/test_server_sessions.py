"""The thread header names the notebook under servers that set no ``JPY_SESSION_NAME`` (classic Notebook 6).

A real Jupyter server runs on loopback with a token: classic Notebook 6 where
it is installed (Colab's stack: notebook 6.5.7), else Jupyter Server (whose
kernels get ``JPY_SESSION_NAME``: the test deletes it in the kernel before the
first message, which is what Notebook 6 gives a kernel). A session for a
notebook is started through the REST API, and ``%load_ext chat_magic`` +
``%chat hi`` run in its kernel through jupyter_client.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import assert_no_secret, wait_until

import chat_magic

pytestmark = pytest.mark.jupyter

CODE = Path(chat_magic.__file__).resolve().parent.parent  # the chat_magic under test, for the kernel


def _classic_notebook() -> bool:
    try:
        import notebook
    except ImportError:
        return False
    return int(notebook.__version__.split(".")[0]) < 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(fast_space, tmp_path):
    """A Jupyter server on 127.0.0.1 with a token, its kernels posting to ``fast_space``."""
    classic = _classic_notebook()
    jupyter = Path(sys.executable).with_name("jupyter")
    app = "notebook" if classic else "server"
    if not jupyter.exists() or shutil.which(f"jupyter-{app}", path=str(jupyter.parent)) is None:
        pytest.skip(f"jupyter {app} is not installed here")
    root = tmp_path / "root"
    (root / "reports").mkdir(parents=True)
    runtime = tmp_path / "runtime"
    token = secrets.token_hex(16)
    port = _free_port()
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), IPYTHONDIR=str(tmp_path / "ipython"),
               GOOGLE_CHAT_WEBHOOK_URL=fast_space.url, CHAT_MAGIC_HOME=str(tmp_path / "kernel-home"),
               CHAT_MAGIC_CONFIG=str(tmp_path / "no-config.toml"),
               PYTHONPATH=str(CODE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("JPY_SESSION_NAME", "CHAT_MAGIC_SOURCE", "CHAT_MAGIC_THREAD_KEY"):
        env.pop(name, None)
    prefix = "NotebookApp" if classic else "ServerApp"
    cmd = [str(jupyter), app, "--no-browser", f"--{prefix}.token={token}", f"--{prefix}.ip=127.0.0.1",
           f"--port={port}", f"--{prefix}.port_retries=0", f"--{prefix}.{'notebook_dir' if classic else 'root_dir'}={root}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - written by the server until the fixture ends
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"token {token}"}

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"jupyter {app} exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
        try:
            return requests.get(f"{base}/api/status", headers=auth, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(up, 90, what=f"jupyter {app} to answer")
        yield {"base": base, "auth": auth, "runtime": runtime, "token": token, "classic": classic,
               "log": tmp_path / "server.log"}
    finally:
        try:
            for k in requests.get(f"{base}/api/kernels", headers=auth, timeout=5).json():
                requests.delete(f"{base}/api/kernels/{k['id']}", headers=auth, timeout=10)
        except Exception:
            pass
        os.killpg(proc.pid, signal.SIGTERM)  # the group this fixture started
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _start_session(server, path: str) -> str:
    body = {"path": path, "type": "notebook", "name": Path(path).name, "kernel": {"name": "python3"}}
    if server["classic"]:
        body["notebook"] = {"path": path}  # Notebook 6's older form, still accepted
    r = requests.post(f"{server['base']}/api/sessions", headers=server["auth"], json=body, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()["kernel"]["id"]


def _ready(client) -> bool:
    """One kernel_info round; False while the kernel is not answering yet.

    jupyter_client 7's wait_for_ready gives up as soon as the heartbeat has
    not beaten yet ("Kernel died before replying"), which a client started
    beside a fresh kernel often sees.
    """
    try:
        client.wait_for_ready(timeout=5)
    except RuntimeError:
        return False
    return True


def _run_in_kernel(server, kernel_id: str, code: str) -> tuple[str, str]:
    """Run ``code`` in the kernel as a frontend would (over its own connection file); return its stdout and stderr."""
    from jupyter_client import BlockingKernelClient

    connection = server["runtime"] / f"kernel-{kernel_id}.json"
    wait_until(connection.exists, 60, what="the kernel's connection file")
    client = BlockingKernelClient(connection_file=str(connection))
    client.load_connection_file()
    client.start_channels()
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def collect(msg: dict) -> None:
        if msg["header"]["msg_type"] == "stream":
            out[msg["content"]["name"]].append(msg["content"]["text"])
        elif msg["header"]["msg_type"] == "error":
            out["stderr"].append("\n".join(msg["content"]["traceback"]))

    try:
        wait_until(lambda: _ready(client), 90, what="the kernel to answer kernel_info")
        reply = client.execute_interactive(code, timeout=90, output_hook=collect)
    finally:
        client.stop_channels()
    assert reply["content"]["status"] == "ok", out
    return "".join(out["stdout"]), "".join(out["stderr"])


CELL = """import os
print("JPY_SESSION_NAME" in os.environ)
os.environ.pop("JPY_SESSION_NAME", None)  # what classic Notebook 6 gives a kernel: no name
globals().pop("__session__", None)  # (ipykernel copies JPY_SESSION_NAME there too)
%load_ext chat_magic
%chat hi
"""


def test_the_header_names_the_notebook_from_the_servers_sessions_api(server, fast_space):
    kernel_id = _start_session(server, "reports/quarterly-report.ipynb")
    stdout, stderr = _run_in_kernel(server, kernel_id, CELL)
    if server["classic"]:
        assert stdout.strip() == "False", "classic Notebook 6 sets no JPY_SESSION_NAME"
    assert "chat_magic" not in stderr, stderr
    msgs = wait_until(fast_space.messages, 30, what="the message")
    texts = "\n".join(m.get("text", "") for m in msgs)
    assert msgs[0]["text"].startswith("📓 *quarterly-report.ipynb* on "), texts
    assert "hi" in texts
    assert server["token"] not in texts
    assert_no_secret(texts, stdout, stderr)


def test_a_kernel_the_server_has_no_session_for_says_ipython(server, fast_space):
    """A kernel started without a session (no notebook): asked, the server names none; nothing raises."""
    r = requests.post(f"{server['base']}/api/kernels", headers=server["auth"], json={"name": "python3"}, timeout=60)
    assert r.status_code == 201, r.text
    stdout, stderr = _run_in_kernel(server, r.json()["id"], CELL)
    assert "chat_magic" not in stderr and "Traceback" not in stderr, stderr
    msgs = wait_until(fast_space.messages, 30, what="the message")
    assert msgs[0]["text"].startswith("🐍 *IPython* on "), msgs[0]["text"]


def test_servers_that_do_not_answer_or_are_not_on_loopback_are_passed_over(tmp_path, monkeypatch):
    """Info files of a server that is gone and of one on another host: nothing asked there, nothing raised."""
    from chat_magic import session

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    connection = runtime / "kernel-0123-abcd.json"
    connection.write_text("{}")
    with socket.socket() as s:  # a port nothing listens on any more
        s.bind(("127.0.0.1", 0))
        gone = s.getsockname()[1]
    (runtime / "jpserver-1.json").write_text(json.dumps({"url": f"http://127.0.0.1:{gone}/", "token": "t", "pid": 1}))
    (runtime / "nbserver-2.json").write_text(json.dumps({"url": "http://192.0.2.1:8888/", "token": "t", "pid": 2}))
    (runtime / "jpserver-3.json").write_text("not json")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher", "-f", str(connection)])
    assert [i["url"] for i in session._server_infos(runtime)] != []
    assert session._server_notebook() == ""
