"""The import rules of docs/architecture.md, checked on the source (ast, nothing imported).

A failure names the module, the line and the rule; fix the import (move the shared piece down a
layer), or change the rule in docs/architecture.md and here together, saying why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "quantgate"

# (importer prefix, forbidden prefixes, why). A prefix matches the module and everything below it.
RULES = [
    ("quantgate.serve", ("quantgate.quantize", "quantgate.evaluate", "quantgate.engines", "quantgate.pipeline",
                         "quantgate.deploy", "quantgate.track", "quantgate.cli", "quantgate.recipe",
                         "quantgate.workspace", "quantgate.models", "quantgate.data", "quantgate.validate",
                         "quantgate.isolate", "quantgate.executors", "quantgate.plots"),
     "the gateway runs from a manifest alone (layer 1, plus workload's trace format), without the toolkit's "
     "heavy stages"),
    ("quantgate.evaluate", ("quantgate.quantize", "quantgate.serve", "quantgate.engines", "quantgate.pipeline",
                            "quantgate.deploy", "quantgate.track", "quantgate.cli"),
     "evaluation measures artifacts; it never makes them or serves them"),
    ("quantgate.quantize", ("quantgate.evaluate", "quantgate.serve", "quantgate.engines", "quantgate.pipeline",
                            "quantgate.deploy", "quantgate.track", "quantgate.cli"),
     "quantization makes artifacts and knows nothing of what happens to them"),
    ("quantgate.engines", ("quantgate.quantize", "quantgate.serve", "quantgate.pipeline", "quantgate.deploy",
                           "quantgate.track", "quantgate.cli"),
     "engines measure artifacts found through the workspace, not through the pipeline"),
    ("quantgate.recipe", ("quantgate.evaluate", "quantgate.quantize", "quantgate.serve", "quantgate.engines",
                          "quantgate.pipeline", "quantgate.workspace"),
     "the recipe is a document; stages read it, it reads no stage"),
    ("quantgate.workload", ("quantgate.evaluate", "quantgate.recipe"), "a spec below the recipe"),
    ("quantgate.documents", ("quantgate.recipe", "quantgate.serve", "quantgate.evaluate", "quantgate.engines",
                             "quantgate.workspace"), "the loader knows no document"),
    ("quantgate.formats", ("quantgate.",), "the format table is pure data and functions"),
    ("quantgate.kernels", ("quantgate.",), "the in-process kernel rule is shared by evaluate/ and serve/"),
    ("quantgate.grading", ("quantgate.progress", "quantgate.documents", "quantgate.formats", "quantgate.integrity",
                           "quantgate.procs", "quantgate.engine_spec", "quantgate.kernels", "quantgate.allocation",
                           "quantgate.workload", "quantgate.recipe", "quantgate.workspace", "quantgate.models",
                           "quantgate.data", "quantgate.evaluate", "quantgate.serve", "quantgate.engines",
                           "quantgate.quantize", "quantgate.deploy", "quantgate.pipeline", "quantgate.cli"),
     "the regression grader is shared by evaluate/ and the gateway's canary "
     "probes"),
    ("quantgate.engine_spec", ("quantgate.util", "quantgate.progress", "quantgate.integrity", "quantgate.kernels",
                               "quantgate.workload", "quantgate.recipe", "quantgate.workspace", "quantgate.models",
                               "quantgate.data", "quantgate.validate", "quantgate.isolate", "quantgate.executors",
                               "quantgate.plots", "quantgate.quantize", "quantgate.evaluate", "quantgate.engines",
                               "quantgate.serve", "quantgate.pipeline", "quantgate.deploy", "quantgate.track",
                               "quantgate.cli"),
     "one engine description for engines/ and serve/: it knows documents, formats and procs only"),
    ("quantgate.integrity", ("quantgate.models", "quantgate.recipe", "quantgate.workspace", "quantgate.serve",
                             "quantgate.engines", "quantgate.evaluate", "quantgate.quantize", "quantgate.deploy"),
     "checksums are layer 1: the gateway verifies artifacts without the model loader"),
    ("quantgate.procs", ("quantgate.util", "quantgate.documents", "quantgate.formats", "quantgate.progress",
                         "quantgate.workload", "quantgate.recipe", "quantgate.workspace", "quantgate.models",
                         "quantgate.data", "quantgate.validate", "quantgate.isolate", "quantgate.plots",
                         "quantgate.quantize", "quantgate.evaluate", "quantgate.engines", "quantgate.serve",
                         "quantgate.pipeline", "quantgate.deploy", "quantgate.track", "quantgate.cli"),
     "the one process launcher (layer 1) is shared by engines/ and serve/: it knows only errors"),
    ("quantgate.workspace", ("quantgate.pipeline", "quantgate.quantize", "quantgate.evaluate", "quantgate.serve",
                             "quantgate.engines", "quantgate.deploy", "quantgate.track"),
     "the run folder is below every stage"),
    ("quantgate.track", ("quantgate.pipeline", "quantgate.quantize", "quantgate.evaluate", "quantgate.serve",
                         "quantgate.engines", "quantgate.deploy", "quantgate.cli"),
     "tracking reads finished records"),
    ("quantgate.deploy", ("quantgate.pipeline", "quantgate.quantize", "quantgate.evaluate", "quantgate.engines",
                          "quantgate.cli"), "promotion reads records through the workspace"),
    ("quantgate.executors", ("quantgate.quantize", "quantgate.evaluate", "quantgate.engines", "quantgate.serve",
                             "quantgate.pipeline", "quantgate.workspace", "quantgate.deploy", "quantgate.track",
                             "quantgate.cli"),
     "an executor runs worker modules by name wherever it is told; it knows no stage and no run folder"),
    ("quantgate.pipeline", ("quantgate.serve", "quantgate.engines", "quantgate.deploy", "quantgate.cli"),
     "the pipeline wires recipe → records; serving is downstream of the manifest"),
]
ANYONE_BUT_ENTRY = ("quantgate.cli", "quantgate.engines.cli", "quantgate.evaluate.loadtest_cli", "quantgate.serve.cli")

# docs/architecture.md's layers, every module in one (the longest matching prefix decides; the package
# itself, `quantgate/__init__.py`, holds only the version): a module imports only from its own layer or
# lower ones; RULES above say more about some of them
LAYERS = {
    1: ("quantgate", "quantgate.errors", "quantgate.util", "quantgate.progress", "quantgate.documents", "quantgate.formats",
        "quantgate.integrity", "quantgate.procs", "quantgate.engine_spec", "quantgate.kernels", "quantgate.allocation",
        "quantgate.grading"),
    2: ("quantgate.workload", "quantgate.recipe", "quantgate.workspace"),
    3: ("quantgate.models", "quantgate.data", "quantgate.validate", "quantgate.isolate", "quantgate.executors",
        "quantgate.plots"),
    4: ("quantgate.quantize", "quantgate.evaluate", "quantgate.engines", "quantgate.track", "quantgate.deploy",
        "quantgate.serve"),
    5: ("quantgate.pipeline",),
    6: ("quantgate.__main__", *ANYONE_BUT_ENTRY),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node, parents) -> bool:
    return any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test) for p in parents)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, only under TYPE_CHECKING) for every quantgate import in a file."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node, parents):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import sweep` imports the submodule
                sub = f"{target}.{alias.name}"
                is_mod = (PKG.parent / (sub.replace(".", "/") + ".py")).is_file() or \
                    (PKG.parent / sub.replace(".", "/")).is_dir()
                out.append((sub if is_mod else target, node.lineno, _type_checking_only(node, parents)))
        elif isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, _type_checking_only(node, parents)) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, parents + [node])

    visit(tree, [])
    return [(m, ln, tc) for m, ln, tc in out if m == "quantgate" or m.startswith("quantgate.")]


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix.rstrip(".") or mod.startswith(prefix if prefix.endswith(".") else prefix + ".")


def test_the_rules_name_real_modules():
    mods = all_modules()
    for importer, forbidden, _ in RULES:
        assert any(_under(m, importer) for m in mods), importer


@pytest.mark.parametrize("importer, forbidden, why", RULES, ids=[r[0] for r in RULES])
def test_modules_import_only_downward(importer, forbidden, why):
    bad = []
    for mod, path in all_modules().items():
        if not _under(mod, importer):
            continue
        for target, line, _ in imports_of(path):
            if any(_under(target, f) and not _under(target, importer) for f in forbidden):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} imports {target}")
    assert not bad, f"{importer} must not import {', '.join(forbidden)} ({why}):\n" + "\n".join(bad)


def layer_of(mod: str) -> int | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            if (mod == p or (p != "quantgate" and _under(mod, p))) and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    return best[0] if best else None


def test_every_module_has_a_layer():
    missing = [m for m in all_modules() if layer_of(m) is None]
    assert not missing, f"modules in no layer of docs/architecture.md (add them to LAYERS and the doc): {missing}"


def test_every_import_points_to_its_own_layer_or_a_lower_one():
    bad = []
    for mod, path in all_modules().items():
        mine = layer_of(mod)
        for target, line, tc in imports_of(path):
            theirs = layer_of(target)
            if not tc and theirs is not None and theirs > mine:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} (layer {mine}) imports {target} "
                           f"(layer {theirs})")
    assert not bad, "imports must point down the layers of docs/architecture.md:\n" + "\n".join(bad)


def test_only_entry_points_import_the_command_line_modules():
    bad = []
    for mod, path in all_modules().items():
        if mod in ("quantgate.__main__", *ANYONE_BUT_ENTRY):
            continue
        for target, line, _ in imports_of(path):
            if target in ANYONE_BUT_ENTRY:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} imports {target}")
    assert not bad, "command-line modules are entry points, not libraries:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["quantgate.serve", "quantgate.engines", "quantgate.evaluate", "quantgate.quantize"])
def test_no_import_cycles_inside_a_package(package):
    mods = {m: p for m, p in all_modules().items() if _under(m, package)}
    graph = {m: {t for t, _, tc in imports_of(p) if t in mods and t != m and not tc} for m, p in mods.items()}
    # a package's __init__ re-exporting its modules is not a cycle through them
    graph = {m: ({t for t in ts if t != package} if m != package else ts) for m, ts in graph.items()}
    state: dict[str, int] = {}

    def cycle_from(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t] if t in stack else [m, t]
            if state.get(t) is None and (found := cycle_from(t, stack + [t])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if state.get(m) is None and (found := cycle_from(m, [m])):
            pytest.fail(f"import cycle in {package}: {' → '.join(found)}")


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The rule test itself can fail: a serve module importing evaluate is caught."""
    fake = tmp_path / "quantgate"
    (fake / "serve").mkdir(parents=True)
    (fake / "evaluate").mkdir()
    for f in ("__init__.py", "serve/__init__.py", "evaluate/__init__.py", "evaluate/stats.py"):
        (fake / f).write_text("")
    (fake / "serve" / "ladder.py").write_text("from ..evaluate.stats import percentile\n")
    globals()["PKG"], saved = fake, PKG
    try:
        with pytest.raises(AssertionError, match=r"serve/ladder.py:1: quantgate.serve.ladder imports quantgate.evaluate"):
            test_modules_import_only_downward(*RULES[0])
    finally:
        globals()["PKG"] = saved


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """A layer-1 module importing a layer-3 one (integrity → models, as it once did) is caught."""
    fake = tmp_path / "quantgate"
    fake.mkdir()
    for f in ("__init__.py", "models.py"):
        (fake / f).write_text("")
    (fake / "integrity.py").write_text("def f():\n    from .models import weights_sha256\n")
    globals()["PKG"], saved = fake, PKG
    try:
        with pytest.raises(AssertionError, match=r"integrity.py:2: quantgate.integrity \(layer 1\) imports "
                                                 r"quantgate.models \(layer 3\)"):
            test_every_import_points_to_its_own_layer_or_a_lower_one()
    finally:
        globals()["PKG"] = saved


# Issue 18's split of the supervisor and the gateway: the new modules take the serve rule strictly
# (layer 1 and serve/ only, not even layer 2), and none reaches back into what it was split from:
# a guard sees the gateway only through its collaborators (guards.Env), so its test needs no gateway.
SPLIT = [("quantgate.serve.cores", ("quantgate.serve.supervisor",)),
         ("quantgate.serve.reaper", ("quantgate.serve.supervisor",)),
         ("quantgate.serve.guards", ("quantgate.serve.gateway", "quantgate.serve.app", "quantgate.serve.server",
                                     "quantgate.serve.supervisor", "quantgate.serve.attempts"))]


@pytest.mark.parametrize("prefix, not_back_into", SPLIT, ids=[s[0] for s in SPLIT])
def test_the_split_modules_import_only_layer_1_and_serve_and_not_what_they_left(prefix, not_back_into):
    mods = {m: p for m, p in all_modules().items() if _under(m, prefix)}
    assert mods, prefix
    bad = []
    for mod, path in mods.items():
        for target, line, _ in imports_of(path):
            allowed = layer_of(target) == 1 or _under(target, "quantgate.serve")
            if not allowed or any(_under(target, b) for b in not_back_into):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} imports {target}")
    assert not bad, "\n".join(bad)
