"""Who imports whom.

Run-time checks import modules in a fresh interpreter and read ``sys.modules``: the storage node
and the SDK load no torch and no compute-server code, the compute server no cache-server code,
the shared code in ``contiguouskv.common`` neither server, and the CLI builds its parser without
torch. Static checks read every source file with ``ast``: module-level imports between project
modules form no cycle, and an import inside a function is only of an optional dependency (or, with
a ``torch-free`` comment, the CLI's late load of the compute server).
"""

from __future__ import annotations

import ast
import functools
import io
import json
import re
import subprocess
import sys
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("cache_server", "compute_server", "client", "contiguouskv")
GENERATED_DIR = "proto"  # generated stubs: import targets, never scanned
TORCH = ("torch", "transformers")
CACHE_SERVER = "contiguouskv.cache_server"
COMPUTE_SERVER = "contiguouskv.compute_server"
# Third-party modules that may be imported inside a function: optional extras (compute, bench,
# otel) and prometheus_client, loaded only where they are used.
OPTIONAL_IMPORTS = frozenset({
    "torch", "transformers", "matplotlib", "opentelemetry", "prometheus_client", "gguf", "numpy",
    "safetensors", "huggingface_hub", "accelerate", "tokenizers",
})
# In a trailing comment: the CLI loads the compute server late; a module whose own import needs an
# optional dependency (the compute server's metrics need prometheus_client, absent on GPU images).
LATE_LOAD_MARKS = ("torch-free", "optional:")


# --- run-time checks: a fresh interpreter per check --------------------------------------------


def _loaded(code: str) -> list[str]:
    """Every module in ``sys.modules`` after a fresh interpreter runs ``code``."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _under(modules: Iterable[str], *packages: str) -> list[str]:
    """The modules that are one of ``packages`` or inside one."""
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)]


def test_storage_node_and_sdk_never_import_torch_or_compute_code() -> None:
    loaded = _loaded("import contiguouskv.cache_server.server, contiguouskv.cache_server.service\n"
                     "import contiguouskv.client")
    assert _under(loaded, *TORCH, COMPUTE_SERVER) == []


def test_compute_server_never_imports_cache_server_code() -> None:
    pytest.importorskip("torch")  # the compute extra
    loaded = _loaded("import contiguouskv.compute_server.server, contiguouskv.compute_server.core\n"
                     "import contiguouskv.compute_server.servicer")
    assert _under(loaded, CACHE_SERVER) == []


def test_shared_code_imports_neither_server() -> None:
    loaded = _loaded("import pkgutil, importlib, contiguouskv.common as common\n"
                     "for m in pkgutil.iter_modules(common.__path__):\n"
                     "    importlib.import_module('contiguouskv.common.' + m.name)")
    assert "contiguouskv.common.placement" in loaded  # the loop did run
    assert _under(loaded, CACHE_SERVER, COMPUTE_SERVER) == []


def test_rebalance_imports_no_compute_code_and_no_torch() -> None:
    assert _under(_loaded("import contiguouskv.rebalance"), *TORCH, COMPUTE_SERVER) == []


def test_cli_builds_its_parser_without_torch() -> None:
    loaded = _loaded("import contiguouskv.cli\n"
                     "contiguouskv.cli.build_parser().parse_args(['serve', 'cache', '--root', 'x'])")
    assert _under(loaded, *TORCH) == []


# --- static checks: ast over the sources --------------------------------------------------------


def _package_dirs() -> dict[str, str]:
    """pyproject.toml's ``[tool.setuptools.package-dir]``: source folder -> package name."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert section, "pyproject.toml has no [tool.setuptools.package-dir]"
    pairs = re.findall(r'^"([\w.]+)"\s*=\s*"([\w./]+)"', section.group(1), re.M)
    return {folder: package for package, folder in pairs}


def _module_name(path: Path, package_dirs: dict[str, str]) -> str:
    """The dotted module name of the source file ``path`` (relative to ROOT)."""
    folder = max((f for f in package_dirs if path.as_posix().startswith(f + "/")), key=len)
    parts = [package_dirs[folder], *path.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass(frozen=True)
class Source:
    path: Path  # relative to ROOT
    module: str
    is_package: bool
    tree: ast.Module
    comments: dict[int, str]  # line -> comment text


@functools.cache
def _sources() -> tuple[Source, ...]:
    package_dirs = _package_dirs()
    out = []
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            text = path.read_text()
            comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                        if tok.type == tokenize.COMMENT}
            out.append(Source(rel, _module_name(rel, package_dirs), path.name == "__init__.py",
                              ast.parse(text, str(rel)), comments))
    return tuple(out)


def _project_modules(sources: Iterable[Source]) -> set[str]:
    """Modules of the scanned sources plus the generated stubs (import targets only)."""
    package_dirs = _package_dirs()
    generated = {_module_name(p.relative_to(ROOT), package_dirs)
                 for p in (ROOT / GENERATED_DIR).rglob("*.py")
                 if any(p.relative_to(ROOT).as_posix().startswith(f + "/") for f in package_dirs)}
    return {s.module for s in sources} | generated


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


Import = ast.Import | ast.ImportFrom
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _imports(nodes: Iterable[ast.AST], in_function: bool = False) -> Iterator[tuple[Import, bool]]:
    """Every import statement in or under ``nodes``, with whether it runs inside a function.

    Imports under ``if TYPE_CHECKING:`` are left out: they never run.
    """
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.orelse, in_function)
        else:
            yield from _imports(ast.iter_child_nodes(node), in_function or isinstance(node, FUNCTIONS))


def _targets(source: Source, stmt: Import, modules: set[str]) -> list[str]:
    """The project modules ``stmt`` imports (``from P import m`` names module ``P.m`` if it is one)."""
    if isinstance(stmt, ast.Import):
        return [a.name for a in stmt.names if a.name in modules]
    base = stmt.module or ""
    if stmt.level:
        package = source.module.split(".") if source.is_package else source.module.split(".")[:-1]
        package = package[:len(package) - (stmt.level - 1)]
        base = ".".join(package + ([stmt.module] if stmt.module else []))
    out = []
    for alias in stmt.names:
        sub = f"{base}.{alias.name}"
        if sub in modules:
            out.append(sub)
        elif base in modules:
            out.append(base)
    return sorted(set(out))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per back edge found by a depth-first search: each a cycle ``a -> ... -> a``."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_cycle_search_reports_each_cycle_as_a_path() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}}) == [["a", "b", "c", "a"], ["d", "d"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}}) == []


def test_module_level_imports_form_no_cycle() -> None:
    sources = _sources()
    modules = _project_modules(sources)
    graph: dict[str, set[str]] = {}
    for source in sources:
        edges = graph.setdefault(source.module, set())
        for stmt, in_function in _imports(source.tree.body):
            if not in_function:
                edges.update(t for t in _targets(source, stmt, modules) if t != source.module)
    assert sum(len(e) for e in graph.values()) > 50  # the resolution found the project's imports
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _top_level(source: Source, stmt: Import) -> list[str]:
    if isinstance(stmt, ast.Import):
        return [a.name.split(".")[0] for a in stmt.names]
    return [source.module.split(".")[0] if stmt.level else (stmt.module or "").split(".")[0]]


def test_imports_inside_functions_are_of_optional_dependencies_only() -> None:
    violations = []
    for source in _sources():
        for stmt, in_function in _imports(source.tree.body):
            if not in_function or all(top in OPTIONAL_IMPORTS for top in _top_level(source, stmt)):
                continue
            lines = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
            if any(mark in source.comments.get(line, "") for mark in LATE_LOAD_MARKS for line in lines):
                continue
            violations.append(f"{source.path}:{stmt.lineno}: {ast.unparse(stmt)}")
    assert not violations, ("imports inside functions (move them to the module's top, or mark an "
                            "optional dependency):\n" + "\n".join(violations))
