"""The project's layers import only downward (README.md, "Architecture"), read statically from every source file.

The rule table (``LAYERS``), bottom to top:

====  =========================================  ======================================================
 1    ``pipeline``                               torch-free, HTTP-free steps: decode, preprocess,
                                                 post-process, RLE, JSON, batches, the config
 2    ``mask2former``, ``model_format``          the torch model and its checkpoints; the exported
                                                 file's metadata and int8 weight storage
 3    ``runtimes``                               one runner interface: torch, ONNX Runtime
 4    ``model_export``, ``service``              weights -> ONNX and its checks; HTTP serving
 5    ``m2f``                                    the CLI and tools on top
 6    ``bench``, ``weights``                     benchmark scripts; how the demo model was made
====  =========================================  ======================================================

The checks:

- (a) no module imports a package of a higher layer, nor another package of its own layer, at module level or
  inside a function;
- (b) no import cycle between project modules, through module-level imports or lazy ones (a lazy import must
  not hide a cycle);
- (c) an import inside a function is for an optional heavy dependency (or a project module that brings one)
  and says so with a ``# lazy: <dependency / why>`` comment; anything else is imported at the top;
- (d) no source file is over ``MAX_LINES`` lines;
- (e) the torch-free half (``TORCH_FREE_*``: the pipeline, the file format, the service, the ONNX Runtime runner)
  does not import torch, through any module-level import; the pipeline imports no HTTP package at all;
- (f) scripts (``SCRIPTS``: bench, weights) do not import one another; what they share is in their folder's
  ``common`` module.

Each check has a self-test that feeds it a small synthetic project with the violation, so that none can pass
by checking nothing.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "pipeline": 1,
    "mask2former": 2,
    "model_format": 2,
    "runtimes": 3,
    "model_export": 4,
    "service": 4,
    "m2f": 5,
    "bench": 6,
    "weights": 6,
}
SCRIPTS = ("bench", "weights")
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
    "skimage",  # scikit-image: the benchmarks' photos (development only)
}
MAX_LINES = 600
TORCH_FREE_PACKAGES = ("pipeline", "model_format", "service")
TORCH_FREE_MODULES = ("runtimes.onnx_runner", "runtimes.ort_session", "runtimes.openvino_runner", "runtimes.cpu_class")
NOT_ON_THE_TORCH_FREE_PATH = {"torch", "triton", "transformers"}
HTTP = {
    "fastapi",
    "starlette",
    "uvicorn",
    "h11",
    "httpx",
    "requests",
    "pydantic",
    "pydantic_settings",
    "prometheus_client",
}


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
    """(a) Imports of a higher layer, or of another package of the same layer."""
    found = []
    for imp in project.imports:
        src, dst = _top(imp.module), _top(imp.target)
        if src not in LAYERS or dst not in LAYERS or src == dst:
            continue
        if LAYERS[dst] > LAYERS[src]:
            found.append(f"{imp.module}:{imp.line} imports {imp.target} (layer {LAYERS[dst]} > {LAYERS[src]})")
        elif LAYERS[dst] == LAYERS[src]:
            found.append(f"{imp.module}:{imp.line} imports {imp.target} (both layer {LAYERS[src]})")
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


def torch_free_roots(project: Project) -> tuple[str, ...]:
    return tuple(m for m in sorted(project.modules) if _top(m) in TORCH_FREE_PACKAGES) + TORCH_FREE_MODULES


def torch_free_violations(project: Project, roots: tuple[str, ...] | None = None) -> list[str]:
    """(e) Module-level imports from ``roots`` (their packages' ``__init__`` run too) that reach torch."""
    found = []
    for root in torch_free_roots(project) if roots is None else roots:
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


def http_violations(project: Project) -> list[str]:
    """(e) Imports of an HTTP package by the pipeline, at module level or inside a function."""
    return [
        f"{imp.module}:{imp.line} imports {imp.target} (the pipeline is HTTP-free)"
        for imp in project.imports
        if _top(imp.module) == "pipeline" and _top(imp.target) in HTTP
    ]


def script_violations(project: Project) -> list[str]:
    """(f) A script importing another script of its folder (only the folder's ``common`` module is shared)."""
    return [
        f"{imp.module}:{imp.line} imports {imp.target} (scripts share only {_top(imp.module)}.common)"
        for imp in project.imports
        if _top(imp.module) in SCRIPTS
        and _top(imp.target) == _top(imp.module)
        and imp.target != f"{_top(imp.module)}.common"
    ]


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


def test_the_torch_free_half_does_not_import_torch():
    assert {"pipeline.steps", "service.app", "runtimes.onnx_runner"} <= set(torch_free_roots(PROJECT))
    assert torch_free_violations(PROJECT) == []


def test_the_pipeline_does_not_import_http():
    assert http_violations(PROJECT) == []


def test_scripts_do_not_import_each_other():
    assert script_violations(PROJECT) == []


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
    assert layer_violations(p) == ["mask2former.a:1 imports service.b (layer 4 > 2)"]
    lazy = synthetic(runtimes__r="def f():\n    from m2f.tool import x  # lazy: torch\n", m2f__tool="x = 1\n")
    assert layer_violations(lazy) == ["runtimes.r:2 imports m2f.tool (layer 5 > 3)"]
    ok = synthetic(m2f__tool="import service.b\nimport runtimes\n", service__b="from pipeline import c\n")
    assert layer_violations(ok) == []


def test_layer_check_catches_an_import_within_a_layer():
    p = synthetic(
        runtimes__run="from model_format.meta import X\n",
        model_format__meta="X = 1\n",
        model_export__check="def f():\n    from service.app import y  # lazy: fastapi\n",
        service__app="y = 1\n",
    )
    assert layer_violations(p) == ["model_export.check:2 imports service.app (both layer 4)"]


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
    package = synthetic(mask2former__init="from pipeline.config import C\n", mask2former__config="C = 1\n")
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
        runtimes__onnx_runner="import onnxruntime\nfrom model_format.int8 import q\n",
        runtimes__ort_session="import onnxruntime\n",
        model_format__int8="import numpy\nimport torch\n",
    )
    assert torch_free_violations(p) == [
        "model_format.int8 imports torch: torch <- model_format.int8",
        "runtimes.onnx_runner imports torch: torch <- model_format.int8 <- runtimes.onnx_runner",
    ]
    ok = synthetic(runtimes__onnx_runner="from model_format.int8 import q\n", model_format__int8="import onnx\n")
    assert torch_free_violations(ok, ("runtimes.onnx_runner",)) == []
    init = synthetic(runtimes__init="import torch\n", runtimes__ort_session="import onnxruntime\n")
    assert torch_free_violations(init, ("runtimes.ort_session",)) == [
        "runtimes.ort_session imports torch: torch <- runtimes <- runtimes.ort_session"
    ]


def test_http_check_catches_the_pipeline_importing_http():
    p = synthetic(
        pipeline__steps="import numpy\ndef f():\n    from fastapi import HTTPException  # lazy: fastapi\n",
        service__app="import fastapi\n",
    )
    assert http_violations(p) == ["pipeline.steps:3 imports fastapi (the pipeline is HTTP-free)"]


def test_script_check_allows_only_common():
    p = synthetic(
        bench__a="from bench.common import x\nfrom bench import b\n",
        bench__b="import bench.common\n",
        bench__common="x = 1\n",
        weights__train="import weights.common\n",
        weights__common="",
    )
    assert script_violations(p) == ["bench.a:2 imports bench.b (scripts share only bench.common)"]
