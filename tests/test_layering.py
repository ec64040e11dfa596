"""The import layering of docs/ARCHITECTURE.md, checked on every module's syntax tree.

Layers, bottom to top; a module may import its own layer and those below, never above:

    ground       runtime.core.*: the model description (config, errors, families, formats), checkpoint I/O,
                 weight maps, the TensorRT-LLM layout and writer, the build-directory contract and sizing
    runtime      the rest of runtime.*: reference models, preprocessing, tokenizer and prompts, executor,
                 client, bench
    plugins      plugins.*: Triton kernels, TensorRT plugins
    triton_repo  triton_repo.*: the Triton model repository, its models and the server
    compiler     builder.*: stages, the build driver, the CLI

The same order holds between the top-level packages (runtime < plugins < triton_repo < builder): no package
imports one above it, so there is no cycle between packages either. No import cycle among the project's
modules, whether the import is at the top of a file or inside a
function. Project imports sit at the top of files; the few inside functions are listed in
LOCAL_IMPORTS with the reason (an optional dependency pulled in by the imported module).
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("builder", "runtime", "plugins", "triton_repo")
LAYERS = ("ground", "runtime", "plugins", "triton_repo", "compiler")
PACKAGE_ORDER = ("runtime", "plugins", "triton_repo", "builder")
# (importer, imported): why the import is inside a function
LOCAL_IMPORTS = {
    ("triton_repo.serving", "plugins.tiling"): "GPU hosts only: pulls in triton (the [kernels] extra)",
}


def layer_of(module: str) -> str:
    if module == "runtime.core" or module.startswith("runtime.core."):
        return "ground"
    top = module.split(".")[0]
    return "compiler" if top == "builder" else top


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(p for p in rel.parts if p != "__init__")
            out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported project module, inside a function, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        return target or None

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in child.names] + [base]
            for t in targets:
                if t.split(".")[0] in PACKAGES and (m := resolve(t)) and m != name:
                    found.append((m, inner, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return sorted(set(found))


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    assert set(layer_of(m) for m in graph) == set(LAYERS)


def test_no_import_goes_up_a_layer(graph):
    upward = [f"{m}:{line} imports {t} ({layer_of(m)} → {layer_of(t)})"
              for m, deps in graph.items() for t, _, line in deps
              if LAYERS.index(layer_of(t)) > LAYERS.index(layer_of(m))]
    assert not upward, "\n".join(upward)


def test_no_package_imports_a_package_above_it(graph):
    """Package level: the ground sits inside runtime, so runtime < plugins < triton_repo < builder."""
    upward = [f"{m}:{line} imports {t}" for m, deps in graph.items() for t, _, line in deps
              if PACKAGE_ORDER.index(t.split(".")[0]) > PACKAGE_ORDER.index(m.split(".")[0])]
    assert not upward, "\n".join(upward)


def test_project_imports_are_at_the_top(graph):
    local = [f"{m}:{line} imports {t} inside a function" for m, deps in graph.items() for t, inner, line in deps
             if inner and (m, t) not in LOCAL_IMPORTS]
    assert not local, "\n".join(local)


def test_no_import_cycle(graph):
    edges = {m: {t for t, _, _ in deps} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def dfs(m, stack):
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" → ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                dfs(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            dfs(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a ground module importing the compiler, inside a function, is caught."""
    f = tmp_path / "config.py"
    f.write_text("def f():\n    from builder.engine_build import build_engine\n")
    found = imports("runtime.core.config", f, {"runtime.core.config", "builder.engine_build"})
    assert found == [("builder.engine_build", True, 2)]
    assert LAYERS.index(layer_of("builder.engine_build")) > LAYERS.index(layer_of("runtime.core.config"))
