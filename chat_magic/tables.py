"""DataFrames as readable tables in a card.

A small frame (a few short columns) becomes a card ``grid`` with one cell per
value, header row first, so its columns line up; a wider one becomes a
monospace block (pandas' own aligned text). Either way only the first rows
and columns are shown, and the shape is said when cut ("12 of 10,000 rows").
Values are untrusted text: HTML-escaped in the monospace block; grid cells
are plain text.

pandas is never imported here: a frame is recognised by its type's module.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["frame_section", "is_frame", "shape_line", "text_section"]

MAX_ROWS = 12
GRID_COLUMNS = 5  # index included: more columns than this and a grid's cells get too narrow to read
GRID_CELL = 24  # characters: a longer value makes the frame a monospace block
WIDE_COLUMNS = 12
BLOCK_CHARS = 6000


def is_frame(obj: Any) -> bool:
    """A pandas DataFrame or Series (or a frame library that mimics its API), without importing pandas."""
    module = type(obj).__module__ or ""
    return module.split(".")[0] in ("pandas", "modin", "cudf") and hasattr(obj, "shape") and hasattr(obj, "to_string") \
        and hasattr(obj, "iloc")


def _frame(obj: Any) -> Any:
    return obj.to_frame() if getattr(obj, "ndim", 2) == 1 else obj


def shape_line(rows: int, cols: int, shown_rows: int, shown_cols: int) -> str:
    """'12 of 10,000 rows · 5 of 40 columns', or '3 rows × 2 columns' when nothing is cut."""
    if shown_rows >= rows and shown_cols >= cols:
        return f"{rows:,} row{'s' if rows != 1 else ''} × {cols:,} column{'s' if cols != 1 else ''}"
    parts = [f"{shown_rows:,} of {rows:,} rows" if shown_rows < rows else f"{rows:,} rows",
             f"{shown_cols:,} of {cols:,} columns" if shown_cols < cols else f"{cols:,} columns"]
    return " · ".join(parts)


def _cell(value: Any) -> str:
    try:
        text = str(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return " ".join(text.split()) or " "


def frame_section(obj: Any, *, label: str = "Result", max_rows: int = MAX_ROWS) -> dict[str, Any]:
    """A card section showing the frame: a grid when small, else a monospace block; the shape when cut."""
    df = _frame(obj)
    rows, cols = (int(n) for n in df.shape)
    head = df.iloc[:max_rows, :WIDE_COLUMNS]
    shown_rows, shown_cols = int(head.shape[0]), int(head.shape[1])
    header = [_cell(df.index.name or "")] + [_cell(c) for c in head.columns]
    body = [[_cell(i)] + [_cell(v) for v in row] for i, row in zip(head.index, head.itertuples(index=False, name=None))]
    cells = header + [c for r in body for c in r]
    small = len(header) <= GRID_COLUMNS and all(len(c) <= GRID_CELL for c in cells)
    widgets: list[dict[str, Any]]
    if small:
        widgets = [{"grid": {"columnCount": len(header), "items": [{"title": c} for c in cells]}}]
    else:
        text = head.to_string(max_colwidth=30, max_cols=WIDE_COLUMNS)
        if len(text) > BLOCK_CHARS:
            text = text[:BLOCK_CHARS].rsplit("\n", 1)[0] + "\n…"
        widgets = [{"textParagraph": {"text": f"<pre>{html.escape(text)}</pre>"}}]
    widgets.append({"textParagraph": {"text": f"<i>{html.escape(shape_line(rows, cols, shown_rows, shown_cols))}</i>"}})
    return {"header": html.escape(label), "widgets": widgets}


def text_section(plain: str, *, label: str = "Table", max_lines: int = MAX_ROWS + 4) -> dict[str, Any]:
    """A displayed table known only by its text (``display(df)``'s ``text/plain``): a monospace block."""
    lines = plain.rstrip("\n").splitlines()
    kept = "\n".join(lines[:max_lines]) + ("\n…" if len(lines) > max_lines else "")
    widgets: list[dict[str, Any]] = [{"textParagraph": {"text": f"<pre>{html.escape(kept[:BLOCK_CHARS])}</pre>"}}]
    if len(lines) > max_lines:
        widgets.append({"textParagraph": {"text": f"<i>{max_lines:,} of {len(lines):,} lines</i>"}})
    return {"header": html.escape(label), "widgets": widgets}
