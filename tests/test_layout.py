"""The house keeps its shape: campaign/analysis needs neither torch nor Ray (a report runs on any
laptop), campaign/faults needs neither Ray nor pyarrow (the engine runs in a notebook), and no
two of the project's modules import each other, directly or around a circle."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bitstorm", "campaign", "trainers", "embeddings")

# Imports every module of the wing in a fresh interpreter and records, for each forbidden
# top-level package that gets imported, the chain of project modules that were executing at that
# moment (innermost first): the first entry is the module whose import statement pulled it in.
PROBE = """
import importlib, json, sys
forbidden, found = set(sys.argv[1].split(",")), {}
project = ("bitstorm", "campaign", "trainers", "embeddings")

class Witness:
    def find_spec(self, name, path=None, target=None):
        if name in forbidden and name not in found:
            frame, chain = sys._getframe(1), []
            while frame is not None:
                module = frame.f_globals.get("__name__", "")
                if module.partition(".")[0] in project and module not in chain:
                    chain.append(module)
                frame = frame.f_back
            found[name] = chain
        return None

sys.meta_path.insert(0, Witness())
for name in sys.argv[2:]:
    importlib.import_module(name)
print(json.dumps(found))
"""


def _modules(folder: Path) -> list[str]:
    return [
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in sorted(folder.rglob("*.py"))
        if path.name != "__init__.py"
    ]


@pytest.mark.parametrize(
    ("wing", "forbidden"),
    [("campaign/analysis", ["torch", "ray"]), ("campaign/faults", ["ray", "pyarrow"])],
)
def test_a_wing_never_imports_what_it_must_not_need(wing, forbidden):
    modules = _modules(ROOT / wing)
    assert len(modules) >= 3, f"{wing} has no modules: was it moved?"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(forbidden), *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(done.stdout)
    assert found == {}, "; ".join(
        f"{chain[0]} imports {package} (reached through {' <- '.join(chain[1:]) or 'itself'})"
        for package, chain in found.items()
    )


def _imports(path: Path, module: str) -> set[str]:
    """Project modules ``path`` imports anywhere (functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in ast.walk(node)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
    }
    return {
        module: {m for m in _imports(path, module) if m in files and m != module}
        for module, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_among_the_project_modules():
    graph = _graph()
    assert "campaign.analysis.stats" in graph and "campaign.faults.engine" in graph
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
