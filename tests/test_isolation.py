"""The suite leaves the user's machine as it found it: no IPython history in ``~/.ipython``,
no ``chat_magic-*`` folder left in the temporary directory.

A child pytest runs a few tests that touch exactly those (a shell made before any fixture, a
real kernel, the temporary stand-in outbox) with ``HOME`` and ``TMPDIR`` pointed at fresh
folders, and the folders are looked at afterwards. The child starts from the environment a
user has (no ``IPYTHONDIR``), so it is this suite's conftest that must do the isolating.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# a shell created before any fixture, a real kernel, the temporary stand-in outbox
PICKED = [
    "test_composer.py::test_compose_magic_in_a_real_shell",
    "test_front_ends.py::test_in_a_real_kernel_the_card_shows_the_cell_not_a_temporary_file",
    "test_hardening.py::test_unusable_outbox_is_replaced_or_stood_in_for_and_says_so[a folder in its place]",
]


@pytest.mark.slow  # a child pytest with a kernel: .ci/run runs it
def test_the_suite_writes_nothing_to_the_users_ipython_nor_leaves_temporary_folders(tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("IPYTHONDIR", "PYTEST_DEBUG_TEMPROOT", "JUPYTER_RUNTIME_DIR")}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", *(str(TESTS / t) for t in PICKED)],
                         cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert f"{len(PICKED)} passed" in out.stdout, out.stdout[-2000:]
    assert not (home / ".ipython").exists(), f"written to ~/.ipython: {sorted(p.name for p in (home / '.ipython').rglob('*'))}"
    left = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("pytest-of-"))
    assert left == [], f"left in the temporary directory: {left}"


@pytest.mark.jupyter
def test_kernels_and_shells_of_this_session_keep_their_history_in_its_own_ipythondir():
    from IPython.paths import get_ipython_dir

    ipdir = Path(get_ipython_dir()).resolve()
    assert ipdir != (Path.home() / ".ipython").resolve()
    assert os.environ["IPYTHONDIR"] == str(ipdir), "kernels and subprocesses inherit it"
