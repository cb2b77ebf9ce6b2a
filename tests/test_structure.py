"""The package's shape holds: no import cycle (imports inside functions counted), every
import goes to the same layer or one below (docs/ARCHITECTURE.md draws them), and no
module outgrows one concept."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from devtools import ROOT

PACKAGE = Path(ROOT) / "src" / "fastdist"

# The layers, bottom up; a module may import from its own layer and those below.
LAYERS: list[tuple[str, set[str]]] = [
    ("core: bytes and syscalls", {
        "fastdist.exceptions", "fastdist.signals", "fastdist.forkserver",
        "fastdist._core", "fastdist._core._wire", "fastdist._core._keepalive",
        "fastdist._core._msgloop", "fastdist._core._shm",
    }),
    ("compiled fast path", {
        "fastdist._fastpath", "fastdist._fastpath._runqueue", "fastdist._fastpath._calls",
        "fastdist._fastpath._packed",
    }),
    ("protocol and transport", {
        "fastdist.protocol", "fastdist.protocol.messages", "fastdist.protocol.handshake",
        "fastdist.protocol.serialize", "fastdist.protocol.values",
        "fastdist.protocol.resent", "fastdist.transport",
        "fastdist.sharedmem", "fastdist.channel", "fastdist.tasks",
        "fastdist.hostbuffers",
    }),
    ("runtime", {
        "fastdist.callpool", "fastdist.refstore", "fastdist.dispatch", "fastdist.output",
        "fastdist.node", "fastdist.handlers",
    }),
    ("API", {
        "fastdist.requests", "fastdist.refs", "fastdist.remotecall", "fastdist.workerpool",
        "fastdist.asyncmap", "fastdist.stats",
    }),
    ("cluster and tools", {
        "fastdist.managers", "fastdist.managers.base", "fastdist.managers.process",
        "fastdist.managers.local", "fastdist.managers.ssh", "fastdist.managers.slurm",
        "fastdist.managers.joining", "fastdist.managers.elastic", "fastdist.workerjoin",
        "fastdist.managers.mpi",
        "fastdist.managers.sshhost", "fastdist.managers.sshsession",
        "fastdist.managers.labelled", "fastdist.hostspawn",
        "fastdist.cluster", "fastdist.spawn", "fastdist.pmap", "fastdist.pmap.scheduling",
        "fastdist.pmap.worker", "fastdist.pmap.calls", "fastdist.pmap.engine", "fastdist.executor",
        "fastdist.farewell",
        "fastdist.workerproc", "fastdist.worker", "fastdist", "fastdist.__main__",
        "fastdist.sharedarray",
    }),
]

# Lines a module may have: past this it holds more than one concept.
MAX_MODULE_LINES = 800


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*"):
        if path.suffix not in (".py", ".pyx") or "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _tree(path: Path) -> ast.Module:
    text = path.read_text()
    if path.suffix == ".pyx":  # Python imports only (cimports are C-level and declared)
        text = "\n".join(line.strip() for line in text.splitlines()
                         if line.strip().startswith(("import ", "from "))
                         and " cimport " not in line)
    return ast.parse(text)


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in it (functions too)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(_tree(path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                # `from fastdist import node` imports fastdist.node, not the package's body
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_lazy_imports_included():
    edges = _imports(_modules())
    cycles = _cycles(edges)
    detail = "\n".join(f"{c}: " + "; ".join(f"{a} -> {sorted(edges[a] & set(c))}" for a in c)
                       for c in cycles)
    assert not cycles, f"import cycles:\n{detail}"


def test_every_module_imports_only_its_own_layer_and_those_below():
    modules = _modules()
    layer_of = {m: i for i, (_, names) in enumerate(LAYERS) for m in names}
    unplaced = sorted(set(modules) - set(layer_of))
    assert not unplaced, f"modules in no layer (add them to LAYERS and the docs): {unplaced}"
    gone = sorted(set(layer_of) - set(modules))
    assert not gone, f"LAYERS names modules that do not exist: {gone}"
    upward = [f"{a} ({LAYERS[layer_of[a]][0]}) imports {b} ({LAYERS[layer_of[b]][0]})"
              for a, targets in sorted(_imports(modules).items()) for b in sorted(targets)
              if layer_of[b] > layer_of[a]]
    assert not upward, "imports that go up:\n" + "\n".join(upward)


def test_no_module_outgrows_one_concept():
    # (Files a compiled module includes count on their own: each holds one concept.)
    files = [p for p in PACKAGE.rglob("*")
             if p.suffix in (".py", ".pyx", ".pxi") and "__pycache__" not in p.parts]
    long = {str(p.relative_to(PACKAGE)): n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"files over {MAX_MODULE_LINES} lines: {long}"
