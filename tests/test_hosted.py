"""Hosted notebooks: webhook secrets (Colab, Kaggle), naming the notebook, and the whole stack in a real kernel.

Colab's ``google.colab.userdata`` and Kaggle's ``kaggle_secrets`` exist only on
those services. These tests put stand-ins on ``sys.path`` (tests/standins:
the same module names, functions and exception classes as the real ones,
reading their secrets from a JSON file) and deliver for real through the
emulator. Everything else is real: IPython, ipykernel, nbclient, papermill,
nbconvert, Jupyter Server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from conftest import KEY, TOKEN, assert_no_secret, committed_clean, validate_message
from kernels import (
    COLAB,
    KAGGLE,
    execute,
    forget_standins,
    make_notebook,
    outputs,
    stream,
    write_secrets,
)

import chat_magic
from chat_magic import config
from chat_magic.errors import WebhookURLError
from chat_magic.session import Session, detect_source

ROOT = Path(__file__).resolve().parent.parent
COLAB_NOTEBOOK = ROOT / "notebooks" / "colab_quickstart.ipynb"


@pytest.fixture
def standins(monkeypatch, tmp_path, outbox_home):
    """Stand-in secret stores: ``standins.use(COLAB)`` / ``(KAGGLE)``, then ``standins.secrets({...})``."""

    class Standins:
        file = tmp_path / "standin-secrets.json"
        calls = tmp_path / "standin-calls.txt"

        def use(self, *dirs: Path) -> None:
            """Put the stand-ins on sys.path and say we run there, as Colab's and Kaggle's runtimes do."""
            for d in dirs:
                monkeypatch.syspath_prepend(str(d))
                monkeypatch.setenv(*{COLAB: ("COLAB_RELEASE_TAG", "standin"), KAGGLE: ("KAGGLE_KERNEL_RUN_TYPE", "Interactive")}[d])
            config.forget_secrets()

        def secrets(self, **values: tuple[str, bool] | str) -> None:
            write_secrets(self.file, {k: (v, True) if isinstance(v, str) else v for k, v in values.items()})

        def looked_up(self) -> list[str]:
            return self.calls.read_text().split() if self.calls.exists() else []

    monkeypatch.setenv("CHAT_MAGIC_STANDIN_SECRETS", str(Standins.file))
    monkeypatch.setenv("CHAT_MAGIC_STANDIN_CALLS", str(Standins.calls))
    monkeypatch.setenv("KAGGLE_USER_SECRETS_TOKEN", "a-kernel-jwt")
    forget_standins()
    yield Standins()
    forget_standins()


def other_space(emulator, name: str) -> str:
    return emulator.webhook_url(space=name, key=KEY, token=TOKEN)


# -- where the webhook comes from ---------------------------------------------------------


def test_the_order_is_to_then_env_then_colab_then_kaggle_then_the_config_file(space, emulator, standins, monkeypatch, tmp_path):
    standins.use(COLAB, KAGGLE)
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL=other_space(emulator, "SCOLAB"))
    cfg = tmp_path / "config.toml"
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(cfg))
    config.write_config({"default": "file", "spaces": {"file": {"webhook_url": other_space(emulator, "SFILE")}}})

    # 1. explicit beats everything; 2. the environment (the space fixture set it) beats the secrets
    assert config.resolve(other_space(emulator, "SEXPLICIT")).space == "SEXPLICIT"
    assert config.resolve().space == space.name
    assert config.describe() == f"environment variable GOOGLE_CHAT_WEBHOOK_URL: spaces/{space.name}"
    # 3. Colab's Secrets panel
    monkeypatch.delenv("GOOGLE_CHAT_WEBHOOK_URL")
    assert config.resolve().space == "SCOLAB"
    assert config.describe() == "Colab secret GOOGLE_CHAT_WEBHOOK_URL: spaces/SCOLAB"
    # 5. neither Colab nor Kaggle has it: the config file's default
    standins.secrets()
    config.forget_secrets()
    assert config.resolve().space == "SFILE"
    assert config.describe() == f"the config file {cfg}: spaces/SFILE"
    # 4. on Kaggle, its secrets come before the config file
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL=other_space(emulator, "SKAGGLE"))
    monkeypatch.delenv("COLAB_RELEASE_TAG")
    forget_standins()  # google.colab no longer imported: not on Colab
    assert config.resolve().space == "SKAGGLE"
    assert config.describe() == "Kaggle secret GOOGLE_CHAT_WEBHOOK_URL: spaces/SKAGGLE"


def test_a_colab_secret_delivers_and_the_header_says_colab(emulator, standins, monkeypatch):
    standins.use(COLAB)
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL=other_space(emulator, "SCOLABSEND"))
    before = len(emulator.messages(space="SCOLABSEND"))
    receipt = chat_magic.send("from Colab")
    assert receipt.wait(30).name.startswith("spaces/SCOLABSEND/messages/")
    msgs = emulator.messages(space="SCOLABSEND")[before:]
    assert [m["text"] for m in msgs] == ["from Colab"]
    assert detect_source() == ("notebook", "Colab")
    for r in emulator.requests:
        if "/spaces/SCOLABSEND/" in r["path"] and r.get("status") == 200:
            validate_message(r["body"])


def test_a_named_space_comes_from_its_own_secret_before_the_config_file(emulator, standins, monkeypatch, tmp_path):
    standins.use(COLAB)
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL_ML_TEAM=other_space(emulator, "SNAMED"))
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(tmp_path / "config.toml"))
    config.write_config({"spaces": {"ml-team": {"webhook_url": other_space(emulator, "SFILE")}}})
    assert config.secret_name("ml-team") == "GOOGLE_CHAT_WEBHOOK_URL_ML_TEAM"
    assert config.resolve("ml-team").space == "SNAMED"
    assert config.describe("ml-team") == "Colab secret GOOGLE_CHAT_WEBHOOK_URL_ML_TEAM: spaces/SNAMED"
    # the environment variable of that name comes first, as for the default
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL_ML_TEAM", other_space(emulator, "SNAMEDENV"))
    assert config.resolve("ml-team").space == "SNAMEDENV"
    with pytest.raises(config.NoDestinationError, match="GOOGLE_CHAT_WEBHOOK_URL_NOPE"):
        config.resolve("nope")


def test_no_notebook_access_is_one_line_and_never_falls_through(emulator, standins, monkeypatch, tmp_path, capsys):
    """Colab raises NotebookAccessError when the secret's Notebook access toggle is off."""
    standins.use(COLAB)
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL=(other_space(emulator, "SDENIED"), False))
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(tmp_path / "config.toml"))
    config.write_config({"spaces": {"file": {"webhook_url": other_space(emulator, "SFILE")}}})  # would be next
    with pytest.raises(config.SecretAccessError) as info:
        config.resolve()
    msg = str(info.value)
    assert "\n" not in msg and "Secrets panel" in msg and "Notebook access" in msg and "GOOGLE_CHAT_WEBHOOK_URL" in msg
    assert_no_secret(msg)

    # in a notebook: one line, no traceback, from a magic and from plain Python alike
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext chat_magic")
    try:
        capsys.readouterr()
        assert not ip.run_cell("%chat hello").success
        assert not ip.run_cell("import chat_magic; chat_magic.send('hello')").success
        out = capsys.readouterr()
        lines = [ln for ln in (out.out + out.err).splitlines() if ln.strip()]
        assert len(lines) == 2, lines
        assert out.err.startswith("UsageError: %chat: this notebook may not read the Colab secret GOOGLE_CHAT_WEBHOOK_URL")
        assert out.out.startswith("SecretAccessError: this notebook may not read the Colab secret")
        assert "Traceback" not in out.out + out.err
    finally:
        ip.run_cell("%unload_ext chat_magic")
    assert emulator.messages(space="SFILE") == [] and emulator.messages(space="SDENIED") == []


def test_a_bad_secret_names_the_secret_not_its_value(standins, monkeypatch):
    standins.use(COLAB)
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL=f"https://example.com/v1/spaces/X/messages?key={KEY}&token={TOKEN}")
    with pytest.raises(WebhookURLError) as info:
        config.resolve()
    assert str(info.value).startswith("Colab secret GOOGLE_CHAT_WEBHOOK_URL: ")
    assert_no_secret(str(info.value))


def test_kaggle_errors_other_than_a_missing_secret_are_one_line(standins, monkeypatch):
    """Outside a Kaggle kernel (no KAGGLE_USER_SECRETS_TOKEN) Kaggle's client raises CredentialError."""
    standins.use(KAGGLE)
    monkeypatch.delenv("KAGGLE_USER_SECRETS_TOKEN")
    with pytest.raises(config.ConfigError, match=r"^cannot read the Kaggle secret GOOGLE_CHAT_WEBHOOK_URL: CredentialError"):
        config.resolve()
    # a secret that is not attached (Kaggle answers BackendError): the advice says where to attach it
    monkeypatch.setenv("KAGGLE_USER_SECRETS_TOKEN", "jwt")
    config.forget_secrets()
    with pytest.raises(config.NoDestinationError, match="Add-ons > Secrets and attach it to this notebook"):
        config.resolve()


def test_a_secrets_module_off_its_host_is_never_asked(standins, monkeypatch):
    """A google-colab package installed elsewhere would wait forever for a Colab frontend: not asked off Colab."""
    monkeypatch.syspath_prepend(str(COLAB))
    monkeypatch.syspath_prepend(str(KAGGLE))
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL="http://127.0.0.1:9/v1/spaces/S/messages?key=k&token=t")
    config.forget_secrets()
    with pytest.raises(config.NoDestinationError, match="^no webhook configured: set GOOGLE_CHAT_WEBHOOK_URL or add"):
        config.resolve()
    assert standins.looked_up() == []


def test_hosted_lookups_are_remembered_for_a_while(emulator, standins):
    standins.use(COLAB)
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL=other_space(emulator, "SCACHE"))
    for _ in range(5):
        assert config.resolve().space == "SCACHE"
    assert standins.looked_up() == ["GOOGLE_CHAT_WEBHOOK_URL"]  # each look-up is a round trip to the frontend
    config.forget_secrets()
    config.resolve()
    assert standins.looked_up() == ["GOOGLE_CHAT_WEBHOOK_URL"] * 2


# -- naming the notebook -------------------------------------------------------------------


def _posting_notebook(path: Path) -> Path:
    return make_notebook(path, "%load_ext chat_magic", "%chat hello from a run", "import chat_magic\nassert chat_magic.flush(30)")


def _header(space) -> str:
    msgs = space.messages()
    assert msgs, "nothing arrived"
    assert len({m["thread"]["name"] for m in msgs}) == 1
    return msgs[0]["text"]


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("JPY_SESSION_NAME", "CHAT_MAGIC_SOURCE", "COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE"):
        env.pop(name, None)
    return env


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["papermill", "nbconvert", "jupyter execute"])
def test_batch_runners_name_the_notebook(space, tmp_path, runner):
    nb = _posting_notebook(tmp_path / f"nightly-{runner.replace(' ', '-')}.ipynb")
    cmd = {
        "papermill": [_bin("papermill"), "--log-level", "ERROR", str(nb), str(tmp_path / "out.ipynb")],
        "nbconvert": [_bin("jupyter-nbconvert"), "--to", "notebook", "--execute", str(nb), "--output", "out.ipynb"],
        "jupyter execute": [_bin("jupyter-execute"), str(nb)],
    }[runner]
    p = subprocess.run(cmd, env=_kernel_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path,
                       stdin=subprocess.DEVNULL, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"*{nb.name}*" in _header(space)
    assert_no_secret(p.stdout, p.stderr)


@pytest.mark.slow
def _wait_for_iopub(client, within: float = 60.0) -> None:
    """Until the client's IOPub socket hears the kernel (a SUB socket loses what was sent before it joined).

    ``execute_interactive`` waits for the kernel's "idle" on IOPub: lost to a
    slow join, it waited out its timeout (seen once on a loaded machine).
    """
    import queue

    deadline = time.monotonic() + within
    while True:
        client.kernel_info()
        try:
            client.get_iopub_msg(timeout=1)
            break
        except queue.Empty:
            assert time.monotonic() < deadline, "the kernel's IOPub never answered"
    while True:  # what the probes said: not this test's output
        try:
            client.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            return


def test_jupyter_server_sessions_name_the_notebook(space, tmp_path):
    """JupyterLab and Notebook 7 start kernels through Jupyter Server's sessions API: the same call here."""
    from jupyter_client import BlockingKernelClient

    _posting_notebook(tmp_path / "lab-analysis.ipynb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _kernel_env() | {"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", f"--ServerApp.port={port}", "--ServerApp.token=t0k3n",
         "--ServerApp.open_browser=False", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.port_retries=0",
         "--ServerApp.allow_root=True"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api"

    def call(path: str, body: dict | None = None, method: str = "GET") -> dict:
        req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": "token t0k3n"},
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                call("/status")
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "Jupyter Server did not start"
                time.sleep(0.2)
        session = call("/sessions", {"path": "lab-analysis.ipynb", "name": "lab-analysis.ipynb", "type": "notebook",
                                     "kernel": {"name": "python3"}}, "POST")
        kernel_id = session["kernel"]["id"]
        client = BlockingKernelClient(connection_file=str(tmp_path / "runtime" / f"kernel-{kernel_id}.json"))
        client.load_connection_file()
        client.start_channels()
        try:
            client.kernel_info()  # jupyter_client 7's wait_for_ready misjudges a kernel it did not start
            assert client.get_shell_msg(timeout=60)["msg_type"] == "kernel_info_reply"
            _wait_for_iopub(client)
            for code in ("%load_ext chat_magic", "%chat hello from the lab", "import chat_magic\nassert chat_magic.flush(30)"):
                reply = client.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
                assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            client.stop_channels()
        call(f"/sessions/{session['id']}", method="DELETE")
    finally:
        server.terminate()
        server.wait(30)
    assert "*lab-analysis.ipynb*" in _header(space)


def test_colab_says_colab_in_a_real_kernel(emulator, standins, tmp_path):
    """The Colab stand-in on the kernel's PYTHONPATH serves the secret; no GOOGLE_CHAT_WEBHOOK_URL anywhere."""
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL=other_space(emulator, "SCOLABKERNEL"))
    nb = _posting_notebook(tmp_path / "Untitled0.ipynb")
    env = _kernel_env() | {"PYTHONPATH": str(COLAB), "COLAB_RELEASE_TAG": "standin"}
    env.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    execute(nb, env=env, log=tmp_path / "kernel.log")
    header = emulator.messages(space="SCOLABKERNEL")[0]["text"]
    assert header.startswith("📓 *Colab* on ")


def test_vscode_and_the_overrides(outbox_home, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    ns = {"__vsc_ipynb_file__": "/home/me/proj/explore.ipynb"}  # VS Code runs code that sets this
    assert detect_source(ns) == ("notebook", "explore.ipynb")
    monkeypatch.setenv("CHAT_MAGIC_SOURCE", "nightly/report.ipynb")
    assert detect_source(ns) == ("notebook", "report.ipynb")
    monkeypatch.delenv("CHAT_MAGIC_SOURCE")

    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext chat_magic")
    try:
        s = Session({})
        chat_magic.session.set_session(s)
        assert ip.run_cell("%chat_thread --name 'weekly metrics.ipynb'").success
        assert s.source == "weekly metrics.ipynb" and s.kind == "notebook"
        assert "weekly-metrics.ipynb" in s.thread_key  # nothing sent yet: the key takes the name too
        r = ip.run_cell("%chat_thread --name ''")
        assert isinstance(r.error_in_exec, Exception) and "the name is empty" in str(r.error_in_exec)
    finally:
        ip.run_cell("%unload_ext chat_magic")


# -- the whole stack in this environment's own kernel --------------------------------------

EVERYTHING = [
    "%load_ext chat_magic",
    "%%chat\n# Fit the model\nprint('fitting')\nscore = 0.93\nscore",
    ("%%chat --title 'Broken step'\nraise ValueError('bad input')", ["raises-exception"]),
    "note = 'all good'\n%chat Status: $note, score {score}",
    ("from chat_magic import notify_when_done\n"
     "with notify_when_done('nightly job') as n:\n"
     "    n.update('halfway there')\n"
     "    total = sum(range(10))"),
    ("from chat_magic import Composer\n"
     "c = Composer()\n"
     "c.message.value = 'hello from the *composer*'\n"
     "c.send_button.click()\n"
     "c"),
    ("import time\n"
     "deadline = time.monotonic() + 30\n"
     "while not c.status.value.startswith(('delivered', 'failed')) and time.monotonic() < deadline:\n"
     "    time.sleep(0.05)\n"
     "print(c.status.value)"),
    ("import sys, IPython, ipywidgets, ipykernel, chat_magic\n"
     "print('stack', sys.prefix, IPython.__version__, ipywidgets.__version__, ipykernel.__version__)\n"
     "chat_magic.flush(30)"),
]


@pytest.mark.slow
def test_everything_in_this_environments_own_kernel(space, tmp_path):
    import ipykernel
    import IPython
    import ipywidgets

    env = _kernel_env() | {"CHAT_MAGIC_SOURCE": "everything.ipynb"}  # nbclient called from Python tells no name
    nb = execute(make_notebook(tmp_path / "everything.ipynb", *EVERYTHING), env=env, log=tmp_path / "kernel.log")

    out = stream(nb, "stdout")
    # the kernel ran on this environment's stack (Colab's pins in the Colab CI block)
    assert f"stack {sys.prefix} {IPython.__version__} {ipywidgets.__version__} {ipykernel.__version__}" in out
    assert re.search(r"^delivered: spaces/\S+/messages/\S+$", out, re.MULTILINE), out
    assert "fitting" in out
    results = [o["data"]["text/plain"] for o in outputs(nb, "execute_result")]
    assert "0.93" in results and results[-1] == "True"
    widget = [o for o in outputs(nb) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widget) == 1 and widget[0]["data"]["text/plain"].startswith("chat_magic Composer")
    errors = outputs(nb, "error")
    assert [e.ename for e in errors] == ["ValueError"]
    assert stream(nb, "stderr") == "", "nothing on stderr"
    kernel_log = (tmp_path / "kernel.log").read_text(errors="replace")
    assert "chat_magic" not in kernel_log and "Traceback" not in kernel_log, kernel_log[-2000:]

    msgs = space.messages()
    assert len({m["thread"]["name"] for m in msgs}) == 1, "one thread"
    everything = json.dumps(msgs, ensure_ascii=False)
    for expected in ("*everything.ipynb*", "Fit the model finished", "Out[2]: 0.93", "Broken step failed",
                     "ValueError: bad input", "Status: all good, score 0.93", "halfway there",
                     "nightly job finished", "hello from the *composer*"):
        assert expected in everything, expected
    for r in space.requests():
        if r.get("status") == 200:
            validate_message(r["body"])
    assert_no_secret(nbformat.writes(nb), kernel_log)


# -- notebooks/colab_quickstart.ipynb --------------------------------------------------------


def test_colab_quickstart_is_committed_clean():
    raw, code = committed_clean(COLAB_NOTEBOOK)
    assert not re.search(r"[?&](key|token)=", raw) and "chat.googleapis.com/v1" not in raw
    sources = "\n".join(c.source for c in code)
    for step in ("%pip install", "GOOGLE_CHAT_WEBHOOK_URL", "%load_ext chat_magic", "%%chat", "notify_when_done"):
        assert step in sources, step
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "INSTALL = True" in params[0].source


@pytest.mark.slow
def test_colab_quickstart_runs_against_the_emulator(emulator, standins, tmp_path):
    """As on Colab: the webhook comes from the Secrets panel (the stand-in); papermill-style INSTALL = False skips %pip."""
    standins.secrets(GOOGLE_CHAT_WEBHOOK_URL=other_space(emulator, "SCOLABQS"))
    nb = nbformat.read(COLAB_NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("# Parameters\nINSTALL = False\n")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    path = tmp_path / COLAB_NOTEBOOK.name
    nbformat.write(nb, path)
    env = _kernel_env() | {"PYTHONPATH": str(COLAB), "COLAB_RELEASE_TAG": "standin"}
    env.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    done = execute(path, env=env, log=tmp_path / "kernel.log")

    assert stream(done, "stderr") == ""
    assert "pip" not in stream(done, "stdout").lower()  # the install cell did nothing
    msgs = emulator.messages(space="SCOLABQS")
    assert len({m["thread"]["name"] for m in msgs}) == 1
    assert msgs[0]["text"].startswith("📓 *Colab* on ")
    everything = json.dumps(msgs, ensure_ascii=False)
    assert "finished" in everything and "epoch 2" in everything
    assert_no_secret(nbformat.writes(done))
