"""Helpers for tests that run code in a real Jupyter kernel (not collected: no test_ prefix)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nbformat

STANDINS = Path(__file__).resolve().parent / "standins"
COLAB, KAGGLE = STANDINS / "colab", STANDINS / "kaggle"


def make_notebook(path: Path, *cells: str | tuple[str, list[str]]) -> Path:
    """Write a notebook of code cells; a cell is its source, or (source, tags)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for c in cells:
        source, tags = (c, []) if isinstance(c, str) else c
        cell = nbformat.v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def execute(nb_path: Path, *, env: dict[str, str], log: Path, timeout: int = 120, allow_errors: bool = False) -> Any:
    """Run the notebook in a fresh python3 kernel (this interpreter's) with ``env``; the kernel's own stderr goes to ``log``."""
    from nbclient import NotebookClient
    from traitlets.config import Config

    nb = nbformat.read(nb_path, as_version=4)
    cfg = Config()
    cfg.KernelManager.shutdown_wait_time = 30.0
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, allow_errors=allow_errors, config=cfg,
                            resources={"metadata": {"path": str(nb_path.parent)}})
    with open(log, "wb") as f:
        client.execute(env=env, stdout=f, stderr=f)
    return nb


def outputs(nb: Any, kind: str | None = None) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind is None or o.output_type == kind]


def stream(nb: Any, name: str) -> str:
    return "".join(o.get("text", "") for o in outputs(nb, "stream") if o.get("name") == name)


def write_secrets(path: Path, secrets: dict[str, tuple[str, bool]]) -> Path:
    """The stand-ins' secrets file: name -> (value, notebook access granted)."""
    path.write_text(json.dumps({k: {"value": v, "access": a} for k, (v, a) in secrets.items()}), encoding="utf-8")
    return path


def forget_standins() -> None:
    """Unimport the stand-ins so that later tests in this process are not 'on Colab'."""
    for name in [m for m in sys.modules if m in ("google.colab", "kaggle_secrets")
                 or m.startswith("google.colab.")]:
        del sys.modules[name]
    from chat_magic import config

    config.forget_secrets()
