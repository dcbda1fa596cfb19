"""The rings of docs/ARCHITECTURE.md, enforced on every import of every regft module.

All imports are read from the source (ast), at module level *and* inside functions, where a
lazy import would hide an edge from a reader and from `sys.modules`. The checks:

(a) no import cycle between regft modules;
(b) ray, mlflow and optuna are imported (at any level) only by orchestration modules;
(c) imports point inward: a module imports its own ring or an inner one, never an outer one;
and every regft module is placed in exactly one ring, so a new module must be placed here.

A module's `if __name__ == "__main__": from regft.X import main` trailer imports itself; that
self-edge is not a cycle.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "regft"

# Inner to outer. A module may import modules of its own ring and of inner rings only.
RINGS: dict[str, tuple[str, ...]] = {
    # ring 0: stdlib only, nothing of regft but errors: the error types, the CLI wrapper and
    # redaction (cli), the terminal/log tee (console)
    "base": ("errors", "cli", "console"),
    # ring 1: plain torch/numpy/stdlib, no files, no Ray/MLflow; unit-tested on seeded tensors
    "pure": ("losses", "ensemble", "zeroshot", "metrics", "prompts", "distributed", "engine",
             "loop", "phases", "reports"),
    # ring 2: one process; files, weights and models; no Ray, no MLflow, no Optuna
    "assembly": ("config", "tasks", "hub", "models", "tiny_diffusion", "realsize", "generators", "shapes",
                 "images", "faults", "store", "realdata", "checkpoint", "export", "mlflow_store",
                 "shared_work", "augment", "ingest"),
    # ring 3: Ray Data/Train/Tune, MLflow, Optuna
    "orchestration": ("rayhook", "raylocal", "resources", "console_ray", "generate", "train", "search_space",
                      "searcher", "tracking", "trial_phases", "registry", "pyfunc_model", "search",
                      "tune"),
    # ring 4: command lines over the rings below; nothing imports them (not even each other)
    "entry": ("predict", "evaluate", "plan"),
}
ORCHESTRATION = "orchestration"
ORCHESTRATION_ONLY = ("ray", "mlflow", "optuna")  # top-level packages allowed in ring 3 only

# Edges that break a rule today, each named with its reason, so the test stays green while the
# code is being moved; every entry is a debt to remove (the test fails when an entry is no
# longer needed, so the list cannot go stale). Format: "importer -> imported".
KNOWN_VIOLATIONS: frozenset[str] = frozenset()
# Modules placed above that another change is still writing (not in the repository yet): their
# absence is allowed. Remove an entry once the module is committed.
PENDING: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str  # module name inside the package, e.g. "train"
    target: str  # imported module: a package module name ("store") or a top-level package ("ray")
    line: int
    in_function: bool
    internal: bool  # target is a module of the package


def _module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def package_modules(package_dir: Path) -> list[str]:
    """Every module of the package (the package's own __init__ excluded)."""
    names = [_module_name(p, package_dir) for p in sorted(package_dir.rglob("*.py"))]
    return [n for n in names if n]


def _targets(node: ast.AST, package: str, importer: str, modules: set[str]) -> list[tuple[str, bool]]:
    """(target, internal) for one import statement."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:  # relative: resolve against the importer's package
            base = importer.split(".")[:-node.level] if "." in importer else []
            mod = ".".join([package, *base] + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        # `from package import x`: x may be a module of the package
        names = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}"[len(package) + 1:] in modules]
        if not names:
            names = [mod]
    out = []
    for name in names:
        if name == package or name.startswith(package + "."):
            inner = name[len(package) + 1:]
            while inner and inner not in modules:  # `import regft.x.y` -> the module regft.x.y or regft.x
                inner = inner.rpartition(".")[0]
            if inner:
                out.append((inner, True))
        else:
            out.append((name.split(".")[0], False))
    return out


def module_imports(path: Path, package_dir: Path, package: str, modules: set[str]) -> list[Import]:
    """Every import in one file, module level and inside functions (and classes)."""
    importer = _module_name(path, package_dir)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target, internal in _targets(child, package, importer, modules):
                    found.append(Import(importer, target, child.lineno, in_function, internal))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                           ast.Lambda)))

    visit(tree, False)
    return found


def import_graph(package_dir: Path, package: str) -> dict[str, list[Import]]:
    modules = set(package_modules(package_dir))
    graph = {}
    for path in sorted(package_dir.rglob("*.py")):
        name = _module_name(path, package_dir)
        if name:
            graph[name] = module_imports(path, package_dir, package, modules)
    return graph


def find_cycles(graph: dict[str, list[Import]], skip: frozenset[str] = frozenset()) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; edges
    named in `skip` ("a -> b") are left out of the graph."""
    edges = {m: sorted({i.target for i in imps if i.internal and i.target != m
                        and f"{m} -> {i.target}" not in skip})
             for m, imps in graph.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return sorted(cycles)


def _where(i: Import) -> str:
    return f"line {i.line}{' (inside a function)' if i.in_function else ''}"


def layering_problems(package_dir: Path, package: str, rings: dict[str, tuple[str, ...]],
                      orchestration: str = ORCHESTRATION, known: frozenset[str] = frozenset(),
                      pending: frozenset[str] = frozenset()) -> list[str]:
    """Every broken rule, one message each (empty: the rings hold). `known` edges are allowed,
    `pending` modules may be missing."""
    graph = import_graph(package_dir, package)
    order = list(rings)
    ring_of = {}
    problems = []
    for ring, members in rings.items():
        for m in members:
            if m in ring_of:
                problems.append(f"{package}.{m}: placed in two rings ({ring_of[m]}, {ring})")
            ring_of[m] = ring
    for m in sorted(set(graph) - set(ring_of)):
        problems.append(f"{package}.{m}: in no ring; place it in RINGS (tests/test_layering.py)")
    for m in sorted(set(ring_of) - set(graph) - pending):
        problems.append(f"{package}.{m}: in RINGS but there is no such module")
    for cycle in find_cycles(graph, skip=known):
        edges = {f"{i.importer} -> {i.target}" for m in cycle for i in graph[m]
                 if i.internal and i.target in cycle and i.target != m}
        problems.append(f"import cycle between {', '.join(package + '.' + m for m in cycle)}: "
                        + "; ".join(sorted(edges)))
    for m, imps in sorted(graph.items()):
        if m not in ring_of:
            continue  # reported above: its imports are judged once it is placed
        for i in imps:
            edge = f"{i.importer} -> {i.target}"
            if edge in known:
                continue
            if not i.internal and i.target in ORCHESTRATION_ONLY and ring_of[m] != orchestration:
                problems.append(f"{package}.{m} ({ring_of[m]}) imports {i.target} at "
                                f"{_where(i)}: only the {orchestration} ring may")
            if i.internal and i.target != m and i.target in ring_of:
                if order.index(ring_of[i.target]) > order.index(ring_of[m]):
                    problems.append(f"{package}.{m} ({ring_of[m]}) imports {package}.{i.target} "
                                    f"({ring_of[i.target]}, an outer ring) at {_where(i)}")
                elif ring_of[i.target] == order[-1]:  # one command line built on another
                    problems.append(f"{package}.{m} imports {package}.{i.target} at {_where(i)}: "
                                    f"nothing imports the {order[-1]} ring")
    return problems


def _edges(package_dir: Path, package: str) -> set[str]:
    return {f"{i.importer} -> {i.target}" for imps in import_graph(package_dir, package).values()
            for i in imps}


# ------------------------------------------------------------------------- the rules ----
def test_the_rings_hold_for_every_import():
    problems = layering_problems(PACKAGE_DIR, "regft", RINGS, known=KNOWN_VIOLATIONS, pending=PENDING)
    assert not problems, "\n".join(problems)


def test_known_violations_are_still_real():
    """An allowance for an edge that no longer exists must be removed."""
    stale = KNOWN_VIOLATIONS - _edges(PACKAGE_DIR, "regft")
    assert not stale, f"remove from KNOWN_VIOLATIONS: {sorted(stale)}"


def test_the_checker_reads_imports_inside_functions():
    imps = import_graph(PACKAGE_DIR, "regft")["models"]
    assert any(i.target == "open_clip" and i.in_function for i in imps)  # heavy: imported lazily
    assert any(i.target == "errors" and i.internal and not i.in_function for i in imps)


# ------------------------------------------------------------- the check can fail ----
def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / f"{name}.py").write_text(text)
    return pkg


FAKE_RINGS = {"base": ("errors",), "pure": ("pure", "a", "b"), "assembly": ("files",),
              "orchestration": ("jobs",), "entry": ("app",)}


def test_the_check_fails_when_a_pure_module_imports_ray_inside_a_function(tmp_path):
    pkg = _write(tmp_path, {
        "errors": "", "a": "", "b": "", "files": "", "jobs": "import ray\n", "app": "",
        "pure": "import math\n\n\ndef f():\n    import ray.tune  # hidden from a header skim\n"
                "    return ray, math\n",
    })
    problems = layering_problems(pkg, "fakepkg", FAKE_RINGS)
    assert problems == ["fakepkg.pure (pure) imports ray at line 5 (inside a function): only the "
                        "orchestration ring may"]


def test_the_check_fails_on_a_cycle_and_on_an_outward_import(tmp_path):
    pkg = _write(tmp_path, {
        "errors": "", "pure": "", "jobs": "", "app": "",
        "a": "from fakepkg import b\n",
        "b": "def g():\n    from . import a\n    return a\n",
        "files": "from fakepkg.jobs import thing\n",
        "stray": "",
    })
    problems = layering_problems(pkg, "fakepkg", FAKE_RINGS)
    assert "fakepkg.stray: in no ring; place it in RINGS (tests/test_layering.py)" in problems
    assert "import cycle between fakepkg.a, fakepkg.b: a -> b; b -> a" in problems
    assert ("fakepkg.files (assembly) imports fakepkg.jobs (orchestration, an outer ring) at line 1"
            in problems)
    assert len(problems) == 3, problems
    # an allowance names the edge it excuses, and only that one
    allowed = layering_problems(pkg, "fakepkg", FAKE_RINGS, known=frozenset({"b -> a"}))
    assert allowed == [p for p in problems if "cycle" not in p]
    # a command line may not be built on another one
    (pkg / "jobs.py").write_text("from fakepkg import app\n")
    assert ("fakepkg.jobs (orchestration) imports fakepkg.app (entry, an outer ring) at line 1"
            in layering_problems(pkg, "fakepkg", FAKE_RINGS))
    (pkg / "jobs.py").write_text("")
    (pkg / "files.py").write_text("")
    (pkg / "app2.py").write_text("def main():\n    from fakepkg import app\n")
    rings = {**FAKE_RINGS, "entry": ("app", "app2")}
    assert layering_problems(pkg, "fakepkg", rings) == [
        "fakepkg.stray: in no ring; place it in RINGS (tests/test_layering.py)",
        "import cycle between fakepkg.a, fakepkg.b: a -> b; b -> a",
        "fakepkg.app2 imports fakepkg.app at line 2 (inside a function): nothing imports the entry ring"]


# --------------------------------------------------- what importing really pulls in ----
PURE = [f"regft.{m}" for m in RINGS["base"] + RINGS["pure"] if m not in PENDING]


def test_importing_the_pure_modules_pulls_in_no_ray_mlflow_or_optuna():
    """The runtime view of (b): nothing an inner module imports at load time drags them in."""
    code = (
        "import sys\n"
        f"for m in {PURE!r}: __import__(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {ORCHESTRATION_ONLY!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure modules pulled in: {out.stdout}"


# ------------------------------------------------------ the doc tells the same story ----
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def ring_table(text: str) -> dict[str, str]:
    """module -> ring, from the doc's table rows `| ring | `module` | what it holds |`."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in RINGS and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = cells[0]
    return rows


def test_architecture_doc_places_every_module_as_the_test_does():
    """docs/ARCHITECTURE.md's ring table lists every module, in the ring RINGS gives it."""
    table = ring_table(ARCHITECTURE.read_text(encoding="utf-8"))
    placed = {m: ring for ring, members in RINGS.items() for m in members}
    assert table == placed, (f"only in the doc: {sorted(set(table) - set(placed))}; only in RINGS: "
                             f"{sorted(set(placed) - set(table))}; other ring: "
                             f"{sorted(m for m in set(table) & set(placed) if table[m] != placed[m])}")


def test_every_module_the_architecture_doc_names_exists():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    modules = set(package_modules(PACKAGE_DIR)) | PENDING
    # module paths, `python -m regft.X`, `regft.X.name` (a one-dot `regft.x` is an MLflow tag)
    named = set(re.findall(r"regft/([a-z_]+)\.py", text)) | set(re.findall(r"-m regft\.([a-z_]+)", text))
    named |= set(re.findall(r"regft\.([a-z_]+)\.[A-Za-z_]", text)) | set(ring_table(text))
    assert named - modules == set(), f"the doc names modules that do not exist: {sorted(named - modules)}"
