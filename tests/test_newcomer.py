"""Rough edges a new user hit (issue 20): the emulator's help and web view, the benchmarks' quick run, installing and releasing.

Each test drives the real thing: the ``chat-magic`` command in a subprocess, the
emulator over HTTP on loopback, ``benchmarks/run.py`` as a script, the README
and the release workflow as committed.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import chat_magic

ROOT = Path(__file__).resolve().parent.parent
CODE = Path(chat_magic.__file__).resolve().parent.parent  # the chat_magic under test, for subprocesses
README = ROOT / "README.md"
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(CODE) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _version() -> str:
    m = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert m, "pyproject.toml has a version"
    return m.group(1)


# -- chat-magic emulator: the webhook URL it prints is documented ------------------------------


def _first_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    line, deadline = b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise AssertionError(f"no line from chat-magic emulator within {timeout:g} s (got {line!r})")
        ch = os.read(proc.stdout.fileno(), 1)
        if not ch:
            break
        line += ch
    return line.decode()


def test_emulator_help_says_it_prints_its_webhook_url():
    out = subprocess.run([sys.executable, "-m", "chat_magic.cli", "emulator", "--help"], capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "prints its webhook URL" in text and "GOOGLE_CHAT_WEBHOOK_URL" in text, text
    assert "Google Chat emulator: webhook URL http://127.0.0.1:PORT/v1/spaces/" in text, text


def test_readme_shows_the_line_the_emulator_prints(tmp_path):
    """The README's example is what `chat-magic emulator` really prints (only the port differs)."""
    proc = subprocess.Popen([sys.executable, "-m", "chat_magic.cli", "emulator", "--port", "0", "--qps", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
    try:
        printed = _first_line(proc).strip()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/", printed)
        assert port, printed
        url = printed.split("webhook URL ", 1)[1]
        r = requests.post(url, json={"text": "hello from the README's emulator"}, timeout=10)
        assert r.status_code == 200, r.text  # the printed URL is a working webhook
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stdout.close()
        proc.stderr.close()
    readme = README.read_text(encoding="utf-8")
    section = readme.split("## The local emulator", 1)[1].split("\n## ", 1)[0]
    assert "prints its webhook URL" in section
    assert f"# {printed.replace(port.group(1), '8085')}" in section, section
    assert "export GOOGLE_CHAT_WEBHOOK_URL='" + url.replace(port.group(1), "8085") + "'" in section


# -- the emulator's web view: what a browser or a crawler asks for is not a rejected request ------


@pytest.mark.parametrize("path", ["/robots.txt", "/favicon.ico"])
def test_emulator_does_not_count_robots_txt_or_the_favicon_as_rejected(fast_emulator, path):
    before = fast_emulator.stats()
    seen = len(fast_emulator.requests)
    r = requests.get(fast_emulator.base_url + path, timeout=10)
    assert r.status_code in (200, 204), (path, r.status_code)
    if path == "/robots.txt":
        assert r.headers["Content-Type"].startswith("text/plain") and "Disallow: /" in r.text
    after = fast_emulator.stats()
    assert after["rejected"] == before["rejected"], f"GET {path} counted as a rejected request"
    assert after["requests"] == before["requests"] and len(fast_emulator.requests) == seen
    page = requests.get(fast_emulator.base_url + "/", timeout=10).text
    assert path not in page  # the web view lists no such request


def test_emulator_still_counts_a_get_of_an_unknown_path(fast_emulator):
    before = fast_emulator.stats()["rejected"]
    r = requests.get(fast_emulator.base_url + "/v1/spaces/AAAA/nothing-here", timeout=10)
    assert r.status_code == 404
    assert fast_emulator.stats()["rejected"] == before + 1


# -- benchmarks/run.py --quick leaves the committed results alone ----------------------------------


def test_benchmarks_quick_run_prints_its_table_and_leaves_results_md_alone(tmp_path):
    """Run the real script from a copy of benchmarks/ (so a regression cannot touch the committed file)."""
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    shutil.copy(ROOT / "benchmarks" / "run.py", bench / "run.py")
    committed = "# the committed full run\n"
    (bench / "results.md").write_text(committed, encoding="utf-8")
    env = _env() | {"CHAT_MAGIC_HOME": str(tmp_path / "home"), "CHAT_MAGIC_CONFIG": str(tmp_path / "none.toml")}
    env.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    out = subprocess.run([sys.executable, str(bench / "run.py"), "--quick", "--only", "startup"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Start-up" in out.stdout and "Mode: --quick" in out.stdout  # the table went to stdout
    assert (bench / "results.md").read_text(encoding="utf-8") == committed, "--quick overwrote benchmarks/results.md"
    assert sorted(p.name for p in bench.iterdir()) == ["results.md", "run.py"]  # and wrote nothing else there
    assert "results.md" in out.stderr  # says where the table did (not) go
    # asked for, it writes the file it is given
    chosen = tmp_path / "quick.md"
    out = subprocess.run([sys.executable, str(bench / "run.py"), "--quick", "--only", "startup", "--out", str(chosen)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Start-up" in chosen.read_text(encoding="utf-8")


# -- installing before the first release, and the release workflow -------------------------------


def test_readme_offers_pypi_only_as_what_works_once_released():
    """`pip install chat-magic` cannot work before a release: every such line says so; the rest install the wheel."""
    readme = README.read_text(encoding="utf-8")
    bare = re.compile(r"pip install (?:-\S+ )*[\"']?chat-magic(?:\[[^\]]*\])?[\"']?(?!\s*@)")
    for line in readme.splitlines():
        if bare.search(line):
            assert "once" in line and "release" in line, f"the README offers a PyPI install that cannot work yet: {line}"
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    wheel = f"dist/chat_magic-{_version()}-py3-none-any.whl"
    assert "python -m pip wheel --no-deps -w dist ." in install and f"pip install {wheel}" in install
    assert "git+https://github.com/OWNER/chat-magic" in install and "placeholder" in install


def test_every_wheel_named_in_the_docs_is_the_current_version():
    version = _version()
    texts = {"README.md": README.read_text(encoding="utf-8"),
             "colab_quickstart.ipynb": (ROOT / "notebooks" / "colab_quickstart.ipynb").read_text(encoding="utf-8")}
    for name, text in texts.items():
        wheels = re.findall(r"chat_magic-([0-9][^-\s]*)-py3-none-any\.whl", text)
        assert wheels, f"{name} names the wheel to install"
        assert set(wheels) == {version}, f"{name} names wheels {sorted(set(wheels))}, pyproject.toml says {version}"
    nb = json.loads(texts["colab_quickstart.ipynb"])
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert any("%pip install -q {PACKAGE}" in s for s in sources)
    assert not any(re.search(r"%pip install (-q )?chat-magic", s) for s in sources)


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def _runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def _uses(job: dict) -> list[str]:
    return [step["uses"] for step in job["steps"] if "uses" in step]


def test_release_workflow_builds_tests_and_publishes_on_a_version_tag():
    wf = _workflow()
    trigger = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert trigger == {"push": {"tags": ["v*"]}}, trigger
    jobs = wf["jobs"]
    build, test, publish = jobs["build"], jobs["test"], jobs["publish"]
    assert "python -m build --sdist --wheel" in _runs(build)
    assert "GITHUB_REF_NAME" in _runs(build) and "pyproject.toml" in _runs(build)  # the tag is the version
    assert any(u.startswith("actions/upload-artifact@") for u in _uses(build))
    assert test["needs"] == "build"
    assert "dist/chat_magic-*.whl)[test]" in _runs(test) and re.search(r"^pytest\b", _runs(test), re.M)
    assert any(u.startswith("actions/download-artifact@") for u in _uses(test))
    assert set(publish["needs"]) == {"build", "test"}
    assert any(u.startswith("pypa/gh-action-pypi-publish@") for u in _uses(publish))
    assert publish["permissions"] == {"id-token": "write"}
    assert publish["environment"]["name"] == "pypi"


def test_release_workflow_stores_no_token():
    wf = _workflow()
    raw = WORKFLOW.read_text(encoding="utf-8")
    assert "secrets." not in raw and "password" not in raw.lower() and "PYPI_API_TOKEN" not in raw
    assert wf["permissions"] == {"contents": "read"}  # only the publish job may ask for an OIDC token
    for name, job in wf["jobs"].items():
        if name != "publish":
            assert "id-token" not in json.dumps(job.get("permissions", {})), name
        for step in job["steps"]:
            assert "password" not in step.get("with", {}), (name, step)
