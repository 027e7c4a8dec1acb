"""The client's shape: the feature modules stand on the multiplexer (no import circle through the
facade), the client never loads server code, and the public API is typed (no ``**kw: Any``)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.client.aclient import AsyncClient
from ferry.client.blocking import Client

SRC = Path(__file__).resolve().parents[1] / "src"


def _imports(path: Path, package: str, modules: set[str]) -> set[str]:
    """The ferry modules ``path`` imports, wherever the import statement is (functions included:
    an import hidden in a function is still a dependency). ``from P import M`` with a module M
    depends on P.M (and not on the package's ``__init__``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ferry"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("ferry"):
                for alias in node.names:
                    sub = f"{name}.{alias.name}"
                    out.add(sub if sub in modules else name)
    return out


def _graph(prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    modules = {
        ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (SRC / "ferry").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if not name.startswith(prefixes):
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = _imports(path, package, set(modules))
        graph[name] = {d for d in deps if d in modules and d != name and d.startswith(prefixes)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_the_client_and_the_wire_layer() -> None:
    """aclient -> exec/transfer -> aclient was a circle (the features called the facade's private
    members); now they depend on the mux, and the facade on them."""
    graph = _graph(("ferry.client", "ferry.wire", "ferry.errors", "ferry.tlsbase"))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    for feature in ("transfer", "tree", "exec", "stdio", "pty", "receive"):
        assert "ferry.client.aclient" not in graph[f"ferry.client.{feature}"], feature
        assert "ferry.client.mux" in graph[f"ferry.client.{feature}"] or feature == "receive"
    # The wire layer is below everything: it imports no endpoint code.
    for name, deps in graph.items():
        if name.startswith("ferry.wire"):
            assert not {d for d in deps if d.startswith("ferry.client")}, name


def test_the_client_loads_no_server_code() -> None:
    code = (
        "import sys\n"
        "import ferry.client.aclient, ferry.client.blocking, ferry.client.transfer, ferry.client.tree\n"
        "import ferry.client.exec, ferry.client.stdio, ferry.client.pty, ferry.client.tls\n"
        "print(sorted(m for m in sys.modules if m.startswith('ferry.server')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("cls", [AsyncClient, Client])
def test_the_public_api_is_typed(cls: type) -> None:
    names = ["get", "put", "get_tree", "put_tree", "run", "stream", "start", "stat", "listdir", "mkdir"]
    for name in names:
        sig = inspect.signature(getattr(cls, name))
        kinds = {p.kind for p in sig.parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{cls.__name__}.{name} takes **kw"
        assert inspect.Parameter.VAR_POSITIONAL not in kinds, f"{cls.__name__}.{name} takes *args"
        for p in sig.parameters.values():
            assert p.name == "self" or p.annotation not in (inspect.Parameter.empty, "Any"), (name, p.name)
        assert sig.return_annotation not in (inspect.Signature.empty, "Any"), f"{cls.__name__}.{name} returns Any"
