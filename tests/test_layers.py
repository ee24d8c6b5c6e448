"""The project's layers import only downward (DESIGN.md, section 2), read statically from every source file.

Layers, bottom to top: 1 the model (``mask2former``), 2 export and runtimes (``model_export``, ``runtimes``),
3 the service (``service``), 4 the tools (``m2f``). The checks:

- (a) no module imports a package of a higher layer, at module level or inside a function; ``model_export``
  and ``runtimes`` (one layer) may import each other, but their modules never in a cycle, lazy imports counted;
- (b) no import cycle between project modules, through module-level imports or lazy ones (a lazy import must
  not hide a cycle);
- (c) an import inside a function is for an optional heavy dependency (or a project module that brings one)
  and says so with a ``# lazy: <dependency / why>`` comment; anything else is imported at the top;
- (d) no source file is over ``MAX_LINES`` lines;
- (e) the ONNX Runtime serving path (``TORCH_FREE``) does not import torch, through any module-level import.

Each check has a self-test that feeds it a small synthetic project with the violation, so that none can pass
by checking nothing.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"mask2former": 1, "model_export": 2, "runtimes": 2, "service": 3, "m2f": 4}
SAME_LAYER_ACYCLIC = ("model_export", "runtimes")
# Optional heavy dependencies (extras, development-only packages): the only ones a function may import.
HEAVY = {
    "torch",
    "triton",
    "transformers",
    "safetensors",
    "onnx",
    "onnxruntime",
    "onnxruntime_extensions",
    "onnxscript",
    "ray",
    "pyarrow",
    "fsspec",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "prometheus_client",
}
MAX_LINES = 600
TORCH_FREE = ("runtimes.onnx_runner", "runtimes.ort_session")
NOT_ON_THE_TORCH_FREE_PATH = {"torch", "triton", "transformers"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module: the project module it names, else the name as written
    line: int
    top_level: bool  # runs when the module is imported (not inside a function)
    lazy_comment: bool  # a "# lazy:" comment on the import's lines


@dataclass
class Project:
    files: dict[str, str]  # path relative to the root -> source
    modules: dict[str, str]  # module name -> path
    imports: list[Import]


def module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top(name: str) -> str:
    return name.split(".")[0]


def scan(files: dict[str, str]) -> Project:
    """Parse ``files`` (path relative to the repository root -> source) and list every import."""
    project = Project(files, {module_name(path): path for path in files}, [])
    for path, source in files.items():
        _collect(project, module_name(path), path.endswith("__init__.py"), source)
    return project


def _resolve(project: Project, name: str) -> str:
    """The project module ``name`` names (its longest known prefix), or ``name`` itself."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in project.modules:
            return ".".join(parts[:n])
    return name


def _collect(project: Project, name: str, is_package: bool, source: str) -> None:
    lines = source.splitlines()
    package = name if is_package else name.rpartition(".")[0]

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [_resolve(project, a.name) for a in node.names]
        base = node.module or ""
        if node.level:  # relative: from this package, `level - 1` packages up
            anchor = package.split(".")[: package.count(".") + 2 - node.level]
            base = ".".join([*anchor, base] if base else anchor)
        subs = [f"{base}.{a.name}" for a in node.names]
        return [sub if sub in project.modules else _resolve(project, base) for sub in subs]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                lazy = "# lazy:" in "\n".join(lines[child.lineno - 1 : child.end_lineno])
                for target in dict.fromkeys(targets(child)):
                    project.imports.append(Import(name, target, child.lineno, not in_function, lazy))
            if not _is_type_checking_block(child):
                visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(source, filename=name), False)


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def project_files() -> dict[str, str]:
    files = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
    return files


def _project_edges(project: Project, top_level_only: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in project.modules}
    for imp in project.imports:
        if imp.target in project.modules and imp.target != imp.module and (imp.top_level or not top_level_only):
            edges[imp.module].add(imp.target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


# ---------------------------------------------------------------------------------------------- the checks
def layer_violations(project: Project) -> list[str]:
    """(a) Imports of a higher layer, and cycles between the modules of the packages that share layer 2."""
    found = []
    for imp in project.imports:
        src, dst = _top(imp.module), _top(imp.target)
        if src in LAYERS and dst in LAYERS and LAYERS[dst] > LAYERS[src]:
            found.append(f"{imp.module}:{imp.line} imports {imp.target} (layer {LAYERS[dst]} > {LAYERS[src]})")
    edges = _project_edges(project, top_level_only=False)
    shared = {m: {t for t in ts if _top(t) in SAME_LAYER_ACYCLIC} for m, ts in edges.items()}
    shared = {m: ts for m, ts in shared.items() if _top(m) in SAME_LAYER_ACYCLIC}
    found += [f"cycle within layer 2 (lazy imports counted) among {', '.join(c)}" for c in cycles(shared)]
    return found


def cycle_violations(project: Project) -> list[str]:
    """(b) Import cycles between project modules: through module-level imports, then with lazy ones counted."""
    found = [f"import cycle among {', '.join(c)}" for c in cycles(_project_edges(project, top_level_only=True))]
    hidden = [
        c
        for c in cycles(_project_edges(project, top_level_only=False))
        if f"import cycle among {', '.join(c)}" not in found
    ]
    return found + [f"import cycle through a lazy import among {', '.join(c)}" for c in hidden]


def lazy_violations(project: Project) -> list[str]:
    """(c) Imports inside functions: only of heavy dependencies or project modules, with a ``# lazy:`` comment."""
    found = []
    for imp in project.imports:
        if imp.top_level:
            continue
        where = f"{imp.module}:{imp.line} ({imp.target})"
        if _top(imp.target) in LAYERS or _top(imp.target) in HEAVY:
            if not imp.lazy_comment:
                found.append(f"{where}: a function-level import without a '# lazy: <dependency / why>' comment")
        else:
            found.append(f"{where}: not an optional heavy dependency; import it at the top of the module")
    return found


def size_violations(project: Project) -> list[str]:
    """(d) Source files over ``MAX_LINES`` lines."""
    return [
        f"{path}: {n} lines (max {MAX_LINES})"
        for path, source in project.files.items()
        if (n := len(source.splitlines())) > MAX_LINES
    ]


def torch_free_violations(project: Project, roots: tuple[str, ...] = TORCH_FREE) -> list[str]:
    """(e) Module-level imports from ``roots`` (their packages' ``__init__`` run too) that reach torch."""
    found = []
    for root in roots:
        seen: dict[str, str | None] = {root: None}  # module -> the module that imported it
        todo = [root]
        while todo:
            mod = todo.pop()
            parents = [".".join(mod.split(".")[:n]) for n in range(1, mod.count(".") + 1)]
            nexts = [p for p in parents if p in project.modules]
            nexts += [i.target for i in project.imports if i.module == mod and i.top_level]
            for target in nexts:
                if target in seen:
                    continue
                seen[target] = mod
                if target in project.modules:
                    todo.append(target)
                elif _top(target) in NOT_ON_THE_TORCH_FREE_PATH:
                    chain, m = [target], mod
                    while m is not None:
                        chain.append(m)
                        m = seen[m]
                    found.append(f"{root} imports {_top(target)}: {' <- '.join(chain)}")
    return found


# ---------------------------------------------------------------------------------------------- the project
PROJECT = scan(project_files())


def test_the_scan_sees_the_project():
    assert {_top(m) for m in PROJECT.modules} == set(LAYERS)
    assert len(PROJECT.modules) > 40 and len(PROJECT.imports) > 300
    assert any(not i.top_level for i in PROJECT.imports), "function-level imports are read too"


def test_no_module_imports_a_higher_layer():
    assert layer_violations(PROJECT) == []


def test_no_import_cycles():
    assert cycle_violations(PROJECT) == []


def test_function_level_imports_are_lazy_for_a_reason():
    assert lazy_violations(PROJECT) == []


def test_no_source_file_is_too_long():
    assert size_violations(PROJECT) == []


def test_the_onnx_runtime_path_does_not_import_torch():
    assert torch_free_violations(PROJECT) == []


# ---------------------------------------------------------------------------------------------- self-tests
def synthetic(**modules: str) -> Project:
    """A project from ``package__module="source"`` keyword arguments (``pkg__init`` is the package)."""
    files = {}
    for key, source in modules.items():
        pkg, _, mod = key.partition("__")
        files[f"{pkg}/{'__init__' if mod == 'init' else mod}.py"] = source
        files.setdefault(f"{pkg}/__init__.py", "")
    return scan(files)


def test_layer_check_catches_an_upward_import():
    p = synthetic(mask2former__a="from service import b\n", service__b="import mask2former.a\n")
    assert layer_violations(p) == ["mask2former.a:1 imports service.b (layer 3 > 1)"]
    lazy = synthetic(runtimes__r="def f():\n    from m2f.tool import x  # lazy: torch\n", m2f__tool="x = 1\n")
    assert layer_violations(lazy) == ["runtimes.r:2 imports m2f.tool (layer 4 > 2)"]
    ok = synthetic(m2f__tool="import service.b\nimport runtimes\n", service__b="from model_export import c\n")
    assert layer_violations(ok) == []


def test_layer_check_catches_a_cycle_between_export_and_runtimes():
    one_way = synthetic(
        runtimes__run="from model_export.meta import X\n",
        model_export__meta="X = 1\n",
        model_export__check="def f():\n    from runtimes.session import open  # lazy: onnxruntime\n",
        runtimes__session="def open(): ...\n",
    )
    assert layer_violations(one_way) == []
    both = synthetic(
        runtimes__run="from model_export.check import X\n",
        model_export__check="X = 1\ndef f():\n    from runtimes.run import Y  # lazy: onnxruntime\n",
    )
    assert layer_violations(both) == [
        "cycle within layer 2 (lazy imports counted) among model_export.check, runtimes.run"
    ]


def test_cycle_check_catches_a_cycle_also_through_a_lazy_import():
    p = synthetic(
        service__a="from service import b\n", service__b="import service.c\n", service__c="import service.a\n"
    )
    assert cycle_violations(p) == ["import cycle among service.a, service.b, service.c"]
    lazy = synthetic(service__a="import service.b\n", service__b="def f():\n    import service.a  # lazy: x\n")
    assert cycle_violations(lazy) == ["import cycle through a lazy import among service.a, service.b"]
    one_way = synthetic(
        service__a="import service.b\n", service__b="def f():\n    import service.c  # lazy: x\n", service__c=""
    )
    assert cycle_violations(one_way) == []
    package = synthetic(mask2former__init="from mask2former.config import C\n", mask2former__config="C = 1\n")
    assert cycle_violations(package) == []  # a package importing its own module is no cycle


def test_lazy_check_needs_a_reason_and_a_heavy_dependency():
    p = synthetic(
        m2f__a=(
            "import json\n"
            "def f():\n"
            "    import torch\n"
            "    import ray  # lazy: ray (the batch extra)\n"
            "    from service import b\n"
            "    import tempfile  # lazy: no reason\n"
            "    from mask2former import (  # lazy: torch\n"
            "        load_model,\n"
            "    )\n"
        ),
        service__b="",
    )
    assert lazy_violations(p) == [
        "m2f.a:3 (torch): a function-level import without a '# lazy: <dependency / why>' comment",
        "m2f.a:5 (service.b): a function-level import without a '# lazy: <dependency / why>' comment",
        "m2f.a:6 (tempfile): not an optional heavy dependency; import it at the top of the module",
    ]


def test_size_check_catches_a_long_file():
    p = synthetic(service__long="x = 1\n" * (MAX_LINES + 1), service__short="x = 1\n" * MAX_LINES)
    assert size_violations(p) == [f"service/long.py: {MAX_LINES + 1} lines (max {MAX_LINES})"]


def test_torch_free_check_follows_imports_and_packages():
    p = synthetic(
        runtimes__init="from runtimes.runner import R\n",
        runtimes__runner="R = 1\ndef f():\n    import torch  # lazy: torch\n",
        runtimes__onnx_runner="import onnxruntime\nfrom model_export.int8 import q\n",
        runtimes__ort_session="import onnxruntime\n",
        model_export__int8="import numpy\nimport torch\n",
    )
    assert torch_free_violations(p) == [
        "runtimes.onnx_runner imports torch: torch <- model_export.int8 <- runtimes.onnx_runner"
    ]
    ok = synthetic(runtimes__onnx_runner="from model_export.int8 import q\n", model_export__int8="import onnx\n")
    assert torch_free_violations(ok, ("runtimes.onnx_runner",)) == []
    init = synthetic(runtimes__init="import torch\n", runtimes__ort_session="import onnxruntime\n")
    assert torch_free_violations(init, ("runtimes.ort_session",)) == [
        "runtimes.ort_session imports torch: torch <- runtimes <- runtimes.ort_session"
    ]
