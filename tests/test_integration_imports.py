"""Importing a training callback: Keras without ``KERAS_BACKEND``, and one line saying what to install.

Each case imports the module in a fresh Python (a real Keras, a real torch):
what happens at import depends on what the process imported before, so it
cannot be tested inside this one. A missing package is made missing the way
Python itself allows, ``sys.modules[name] = None``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import chat_magic

ROOT = Path(__file__).resolve().parent.parent
CODE = Path(chat_magic.__file__).resolve().parent.parent  # the chat_magic under test, for subprocesses
pytestmark = pytest.mark.slow  # each case starts a Python that imports a framework


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_keras_and_torch = pytest.mark.skipif(not (_has("keras") and _has("torch")), reason="Keras and torch not installed (the ml extra)")


def _python(code: str, tmp_path: Path, **env: str | None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(CODE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "KERAS_HOME": str(tmp_path / "keras-home")}  # no keras.json of the user's: Keras's own default
    full.pop("KERAS_BACKEND", None)
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=tmp_path, timeout=240)


IMPORT_KERAS = "from chat_magic.integrations.keras import ChatCallback\nimport keras\nprint(keras.backend.backend())"


def _one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0
    assert "During handling of the above exception" not in p.stderr, p.stderr  # no chained raw ModuleNotFoundError
    return p.stderr.strip().splitlines()[-1]


@needs_keras_and_torch
@pytest.mark.skipif(_has("tensorflow"), reason="TensorFlow is installed: Keras's own default works")
def test_keras_callback_imports_without_keras_backend_and_says_which_backend(tmp_path):
    p = _python(IMPORT_KERAS, tmp_path)
    assert p.returncode == 0, p.stderr[-1500:]
    chosen = p.stdout.strip().splitlines()[-1]
    assert chosen == ("torch" if _has("torch") else "jax")
    said = [line for line in p.stderr.splitlines() if line.startswith("chat_magic:")]
    assert len(said) == 1 and "KERAS_BACKEND" in said[0] and f"using {chosen}" in said[0], p.stderr


@needs_keras_and_torch
def test_keras_backend_the_user_chose_is_left_alone(tmp_path):
    p = _python(IMPORT_KERAS, tmp_path, KERAS_BACKEND="torch")
    assert p.returncode == 0, p.stderr[-1500:]
    assert p.stdout.strip().splitlines()[-1] == "torch" and "chat_magic:" not in p.stderr


@needs_keras_and_torch
def test_keras_json_backend_that_is_installed_is_left_alone(tmp_path):
    home = tmp_path / "keras-home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps({"backend": "torch"}), encoding="utf-8")
    p = _python(IMPORT_KERAS, tmp_path)
    assert p.returncode == 0, p.stderr[-1500:]
    assert p.stdout.strip().splitlines()[-1] == "torch" and "chat_magic:" not in p.stderr


@needs_keras_and_torch
def test_keras_already_imported_is_not_touched(tmp_path):
    """Keras loaded first (its backend fixed): the module sets nothing and says nothing."""
    code = "import keras\nfrom chat_magic.integrations.keras import ChatCallback\nimport os\nprint(os.environ.get('KERAS_BACKEND'))"
    p = _python(code, tmp_path, KERAS_BACKEND="")
    if p.returncode != 0:  # Keras's default backend (tensorflow) is not installed: the user's own import fails first
        assert "import keras" in p.stderr and "chat_magic" not in p.stderr.splitlines()[-1]
        return
    assert p.stdout.strip() in ("", "None") and "chat_magic:" not in p.stderr


@needs_keras_and_torch
@pytest.mark.skipif(_has("jax"), reason="JAX is installed")
def test_a_chosen_backend_that_is_missing_is_one_line_saying_what_to_install(tmp_path):
    line = _one_line_error(_python(IMPORT_KERAS, tmp_path, KERAS_BACKEND="jax"))
    assert line.startswith("ModuleNotFoundError: chat_magic.integrations.keras:") and "pip install jax" in line, line


@pytest.mark.parametrize("module, blocked, says", [
    ("keras", "keras", "chat_magic.integrations.keras needs Keras 3: pip install keras"),
    ("transformers", "transformers", "chat_magic.integrations.transformers needs Hugging Face Transformers"),
])
def test_a_missing_framework_is_one_line_saying_what_to_install(tmp_path, module, blocked, says):
    code = f"import sys\nsys.modules[{blocked!r}] = None\nfrom chat_magic.integrations.{module} import ChatCallback"
    line = _one_line_error(_python(code, tmp_path, KERAS_BACKEND="torch"))
    assert line.startswith(f"ModuleNotFoundError: {says}") and "pip install" in line, line


def test_readme_says_what_importing_the_keras_callback_does_with_keras_backend():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = " ".join(readme.split("## Training frameworks", 1)[1].split("\n## ", 1)[0].split())
    assert "sets `KERAS_BACKEND` to the first installed of torch, jax, tensorflow" in section, section
