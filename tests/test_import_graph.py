"""The package's connections (issue 20): no import cycle, nothing underscored crosses a module.

Read from the source with ``ast``, every import counted (at the top, inside a
function, or lazily for speed) but those under ``if TYPE_CHECKING:``, which
never run. Importing the package ``chat_magic`` itself from a submodule counts
as importing its ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import chat_magic

ROOT = Path(chat_magic.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> set[str]:
    """The chat_magic modules that module ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's smallest rotation, found by a depth-first search from each module."""
    found: set[tuple[str, ...]] = set()

    def visit(path: list[str]) -> None:
        for nxt in sorted(graph[path[-1]]):
            if nxt in path:
                cyc = path[path.index(nxt):]
                i = cyc.index(min(cyc))
                found.add(tuple(cyc[i:] + cyc[:i]))
            else:
                visit([*path, nxt])

    for start in graph:
        visit([start])
    return [list(c) for c in sorted(found)]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    assert "chat_magic.cells" in graph["chat_magic.runall"]  # the graph is read, not empty
    assert cycles(graph) == []


# a class and the helper class it owns, in the same module: the helper is part of it
FRIENDS = {("delivery.py", "d"), ("outbox.py", "box")}  # _Lane, the sender thread of one Dispatcher; _Tx, of one Outbox
# threading.RLock's own methods: the only way to ask whether this thread holds a lock, and to give
# back every hold an interrupt left behind (edges-tx: the outbox's gate and lease lock)
RLOCK_INTERNALS = {"_is_owned", "_release_save", "_acquire_restore"}


def test_nothing_underscored_crosses_a_module():
    """``other_module._name``, or ``self.other._name`` (another object's privates): public doors instead."""
    reached = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and (n.level or (n.module or "").startswith("chat_magic")) for a in n.names}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in imported:
                reached.append(f"{path.name} {owner.id}.{node.attr}")
            elif (isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "self"
                  and (path.name, owner.attr) not in FRIENDS and node.attr not in RLOCK_INTERNALS):
                reached.append(f"{path.name} self.{owner.attr}.{node.attr}")
        for node in ast.walk(tree):  # from .outbox import _Tx
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("chat_magic")):
                reached += [f"{path.name} from .{node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__") and node.module]
    assert sorted(set(reached)) == []


def test_the_readme_layout_names_every_module():
    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = {line.split()[0] for line in layout.splitlines()[1:] if line.startswith("  ")}
    present = {p.name for p in ROOT.glob("*.py")} | {p.name + "/" for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert sorted(present - listed) == [] and sorted(listed - present) == []


def test_docstrings_point_inside_the_repository():
    outside = [f"{p.relative_to(ROOT.parent)}: {w}" for p in MODULES.values()
               for w in ("/work/", "/home/", "/tmp/shared") if w in p.read_text(encoding="utf-8")]
    assert outside == []


MAX_FUNCTION_LINES = 100  # the emulator's _decide was 129 lines doing nine jobs


def test_no_function_is_a_page_long():
    long = [f"{p.relative_to(ROOT)}:{n.name} {n.end_lineno - n.lineno + 1} lines" for p in MODULES.values()
            for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


ALL_PENDING: set[str] = set()  # modules whose __all__ waits for a branch in flight (none now)


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_every_module_says_what_it_exports():
    """``__all__`` in every module, naming only what the module defines (httpx's rule, module by module)."""
    missing, unknown = [], []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        declared = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    and any(getattr(t, "id", "") == "__all__" for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]
        if not declared:
            if name not in ALL_PENDING:
                missing.append(name)
            continue
        value = declared[0].value
        exported = ast.literal_eval(value) if value is not None else []
        defined = _top_level_names(tree)
        lazy = "__getattr__" in defined  # a module that makes some names on first use (the package, progress)
        unknown += [f"{name}.{n}" for n in exported if n not in defined and not lazy]
    assert missing == [] and unknown == []


def test_both_pacers_live_in_pacing_which_imports_nothing_of_the_outbox_even_for_types():
    """``Outbox.claim -> RedisSlot.claim -> Outbox.claim_local`` was an import cycle under TYPE_CHECKING."""
    from chat_magic import outbox, pacing

    every = set()
    for node in ast.walk(ast.parse(MODULES["chat_magic.pacing"].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            every.update([node.module] if node.module else [a.name for a in node.names])
    assert "outbox" not in every and "config" in every  # read, not empty
    assert outbox.SqlitePacer is pacing.SqlitePacer and pacing.SqlitePacer.__module__ == "chat_magic.pacing"
