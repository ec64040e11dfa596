"""The package graph of docs/ARCHITECTURE.md, checked on every module's syntax tree.

Groups of modules, and what each may import besides itself (ALLOWED):

    ground    runtime.core.*: the model description (config, errors, families, formats, the request schema),
              checkpoint I/O, weight maps, the TensorRT-LLM layout and writer, the build-directory contract, sizing
    runtime   the rest of runtime.*: reference models, preprocessing, tokenizer and prompts, reference executor
    plugins   plugins.*: Triton kernels, TensorRT plugins
    clients   clients.*: nvlm-client, the OpenAI client, nvlm-bench — never the server or the compiler
    demo      demo_model.*: the embedded default's task and training
    server    triton_repo.*: the Triton model repository, its models, the server, the OpenAI front
    compiler  builder.*: stages, the build driver, the CLI

The graph has no cycle, so neither do the packages; no import cycle among modules either, whether the import is
at the top of a file or inside a function. Project imports sit at the top of files; the few inside functions
are listed in LOCAL_IMPORTS with the reason (an optional dependency pulled in by the imported module).
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("builder", "runtime", "plugins", "triton_repo", "clients", "demo_model")
GROUPS = ("ground", "runtime", "plugins", "clients", "demo", "server", "compiler")
ALLOWED = {
    "ground": set(),
    "runtime": {"ground"},
    "plugins": {"ground", "runtime"},
    "clients": {"ground", "runtime"},
    "demo": {"ground", "runtime"},
    # the OpenAI front talks to the entry as a gRPC client; generate sizes the entry processes by clients.roofline
    "server": {"ground", "runtime", "plugins", "clients"},
    "compiler": {"ground", "runtime", "plugins", "demo", "server"},
}
# (importer, imported): why the import is inside a function
LOCAL_IMPORTS = {
    ("triton_repo.models.preprocessing", "plugins.tiling"): "GPU hosts only: pulls in triton (the [kernels] extra)",
}


def group_of(module: str) -> str:
    if module == "runtime.core" or module.startswith("runtime.core."):
        return "ground"
    return {"builder": "compiler", "triton_repo": "server", "demo_model": "demo"}.get(module.split(".")[0],
                                                                                    module.split(".")[0])


def violations(graph) -> list[str]:
    return [f"{m}:{line} imports {t} ({group_of(m)} → {group_of(t)})"
            for m, deps in graph.items() for t, _, line in deps
            if group_of(t) != group_of(m) and group_of(t) not in ALLOWED[group_of(m)]]


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


def test_every_module_has_a_group(graph):
    assert set(group_of(m) for m in graph) == set(GROUPS)


def test_the_allowed_graph_has_no_cycle():
    """ALLOWED itself is acyclic (so the packages cannot import each other in a circle), and the runtime
    never sees the client side."""
    order = []
    while len(order) < len(GROUPS):
        ready = [g for g in GROUPS if g not in order and ALLOWED[g] <= set(order)]
        assert ready, f"cycle among {set(GROUPS) - set(order)}"
        order += ready
    assert "clients" not in ALLOWED["runtime"] | ALLOWED["ground"]
    assert not {"server", "compiler"} & ALLOWED["clients"]


def test_every_import_follows_the_graph(graph):
    bad = violations(graph)
    assert not bad, "\n".join(bad)


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


def test_the_check_sees_a_wrong_import(tmp_path):
    """The checker itself: a ground module importing the compiler inside a function, and the client importing
    the server, are both caught."""
    f = tmp_path / "config.py"
    f.write_text("def f():\n    from builder.engine_build import build_deployment\n")
    found = imports("runtime.core.config", f, {"runtime.core.config", "builder.engine_build"})
    assert found == [("builder.engine_build", True, 2)]
    g = tmp_path / "bench.py"
    g.write_text("from triton_repo.serving import EntryModel\n")
    graph = {"runtime.core.config": found,
             "clients.bench": imports("clients.bench", g, {"clients.bench", "triton_repo.serving"})}
    assert violations(graph) == ["runtime.core.config:2 imports builder.engine_build (ground → compiler)",
                                 "clients.bench:1 imports triton_repo.serving (clients → server)"]
