"""No source file of the package may unpickle: no pickle, no *_pyobj, no unsafe torch.load."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gossipdqn"
BANNED_NAMES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "recv_pyobj", "send_pyobj"}


def _banned_names(source: str) -> list[str]:
    """Banned identifiers in code (comments and strings do not count)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [
        f"line {tok.start[0]}: {tok.string}"
        for tok in tokens
        if tok.type == tokenize.NAME and tok.string in BANNED_NAMES
    ]


def _is_true(node: ast.keyword) -> bool:
    return isinstance(node.value, ast.Constant) and node.value.value is True


def _unsafe_calls(source: str) -> list[str]:
    """torch.load without weights_only=True, and any allow_pickle=True."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_torch_load = (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and isinstance(func.value, ast.Name)
            and func.value.id == "torch"
        )
        kwargs = {k.arg: k for k in node.keywords}
        if is_torch_load and not ("weights_only" in kwargs and _is_true(kwargs["weights_only"])):
            problems.append(f"line {node.lineno}: torch.load without weights_only=True")
        if "allow_pickle" in kwargs and not (
            isinstance(kwargs["allow_pickle"].value, ast.Constant)
            and kwargs["allow_pickle"].value.value is False
        ):
            problems.append(f"line {node.lineno}: allow_pickle")
    return problems


def problems_in(source: str) -> list[str]:
    return _banned_names(source) + _unsafe_calls(source)


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_sources() -> None:
    assert any(p.name == "wire.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_source_never_unpickles(path: Path) -> None:
    assert problems_in(path.read_text()) == [], path


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from pickle import loads",
        "sock.recv_pyobj()",
        "sock.send_pyobj(x)",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "np.load(path, allow_pickle=True)",
        "import cloudpickle as cp",
    ],
)
def test_the_scanner_catches(snippet: str) -> None:
    assert problems_in(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        "torch.load(path, map_location='cpu', weights_only=True)",
        "# never pickle on the wire",
        "x = 'pickle'",
        "np.load(path, allow_pickle=False)",
    ],
)
def test_the_scanner_allows(snippet: str) -> None:
    assert problems_in(snippet) == []
