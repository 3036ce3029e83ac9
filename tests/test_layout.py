"""The package's shape: imports flow one way between subsystems, no cycles, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gossipdqn"
GROUND = {"config", "types", "exchange", "partition", "__init__"}
ALLOWED = {
    "ground": {"ground"},
    "dqn": {"dqn", "ground"},
    "net": {"net", "ground"},
    "node": {"node", "dqn", "net", "ground"},
    "gossip": {"gossip", "node", "dqn", "net", "ground"},
    "cluster": {"cluster", "ground"},
    "baselines": {"baselines", "cluster", "gossip", "node", "dqn", "net", "ground"},
}
"""What each subsystem may import; the top level (cli, report, ...) may import anything."""
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def modules() -> dict[str, Path]:
    """Dotted name (without the `gossipdqn.` prefix) of every module in the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts)] = path
    return out


def subsystem(name: str) -> str:
    head = name.split(".")[0]
    if "." not in name:
        return "ground" if head in GROUND else "top"
    return "ground" if head == "__init__" else head


def imported(path: Path) -> set[str]:
    """gossipdqn modules `path` imports anywhere (lazy ones too), except for type checking."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
        and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)
    }  # fmt: skip
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            names |= {f"{base}.{a.name}" for a in node.names} | {base}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    known = modules()
    out = set()
    for name in names:
        if name.startswith("gossipdqn."):
            short = name.removeprefix("gossipdqn.")
            if short in known:
                out.add(short)
            elif f"{short}.__init__" in known:
                out.add(f"{short}.__init__")
    return out


def test_the_check_sees_a_lazy_import_and_skips_type_checking_ones(tmp_path: Path) -> None:
    """A negative first: a dqn module that imports the network layer lazily is caught."""
    module = tmp_path / "module.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gossipdqn.gossip.protocol import Gossip\n"
        "def f():\n    from gossipdqn.net.transport import Transport\n"
    )
    assert imported(module) == {"net.transport"}
    assert subsystem("net.transport") not in ALLOWED[subsystem("dqn.learner")]


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_flow_one_way(name: str) -> None:
    mine = subsystem(name)
    if mine == "top":
        return
    bad = sorted(o for o in imported(modules()[name]) if subsystem(o) not in ALLOWED[mine])
    assert not bad, f"gossipdqn.{name} ({mine}) imports {bad}; allowed: {sorted(ALLOWED[mine])}"


def test_no_circular_imports() -> None:
    graph = {name: imported(path) - {name} for name, path in modules().items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name) :] + [name]
            raise AssertionError("circular import: " + " -> ".join(cycle))
        if name in done:
            return
        for other in sorted(graph.get(name, ())):
            visit(other, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_and_classes_stay_small(name: str) -> None:
    path = modules()[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path}: {lines} lines, expected at most {MAX_MODULE_LINES}"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{path}: class {node.name} is {size} lines"
