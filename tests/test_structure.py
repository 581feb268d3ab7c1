"""The shape of the package (issue 16): no module above 400 lines, no import cycle anywhere in ``src/`` (imports
inside functions count, ``if TYPE_CHECKING:`` blocks do not), and no dispatch on a method's name outside
``methods/``."""
from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fedlora"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that importing (or running any function of) ``name`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            visit(child)

    visit(tree)
    edges = set()
    for target in found:
        # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in modules and mod != name and not name.startswith(mod + "."):
                edges.add(mod)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_module_is_longer_than_400_lines():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules above {MAX_LINES} lines: {long}"


def test_there_is_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _dispatch_lines(names: list[str], allowed: tuple[str, ...]) -> list[str]:
    """Lines outside ``allowed`` modules that compare something with one of ``names`` (``== "x"``, ``in ("x", …)``,
    ``"x" == …``, ``["x"]`` lookups are not dispatch)."""
    alternatives = "|".join(map(re.escape, names))
    before = re.compile(r"""(==|!=|\bin)\s*[\(\[{]?\s*["'](%s)["']""" % alternatives)
    after = re.compile(r"""["'](%s)["']\s*(==|!=|in\b)""" % alternatives)
    offenders = []
    for name, path in _modules().items():
        if name.startswith(allowed):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if before.search(line) or after.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    return offenders


def test_no_dispatch_on_a_method_name_outside_methods():
    from fedlora.registry import BUILTIN_METHODS

    assert not (offenders := _dispatch_lines(sorted(BUILTIN_METHODS), ("fedlora.methods", "fedlora.registry"))), \
        offenders


def test_no_dispatch_on_a_task_name_outside_the_task_modules():
    from fedlora.tasks import TASKS

    allowed = ("fedlora.tasks", "fedlora.data", "fedlora.config_checks")  # config checks validate data.task's keys
    assert not (offenders := _dispatch_lines(sorted(TASKS), allowed)), offenders


def test_no_dispatch_on_a_model_alias_outside_the_model_registry():
    from fedlora.models import BUNDLED_MODELS

    assert not (offenders := _dispatch_lines(sorted(BUNDLED_MODELS), ("fedlora.models",))), offenders


def test_every_method_file_is_at_most_350_lines():
    methods = SRC / "fedlora" / "methods"
    long = {p.name: n for p in methods.glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 350}
    assert not long, f"method files above 350 lines: {long}"
