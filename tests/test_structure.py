"""Stage modules talk through tinyrl.types / config / errors / hub (a leaf: is the hub reachable) only; loop.py
(training), evaluate.py (evaluation), trl.py (the TRL reward functions) and the CLI wire them. A stage may be a
package (tinyrl/budget/, tinyrl/policy/, tinyrl/memory/, tinyrl/rewards/): its files import each other and the shared modules, never
another stage. No two modules import each other, directly or round a longer cycle."""

import ast
import os

import tinyrl

PKG = os.path.dirname(tinyrl.__file__)
SHARED = {"types", "config", "errors", "hub", "decoding"}  # decoding: policy's static decoding step, also a leaf
WIRING = {"loop", "task", "update", "evaluate", "cli", "trl", "__init__", "__main__"}
PACKAGES = {"budget", "policy", "memory", "tasks", "rewards"}  # stages split into files


def module_name(path):
    """tinyrl/budget/search.py -> 'tinyrl.budget.search'; a package's __init__.py -> the package."""
    parts = os.path.relpath(path, os.path.dirname(PKG))[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source, name, is_package=False, top_level_only=False):
    """The tinyrl modules that the module `name` imports, as dotted names, relative imports resolved. With
    top_level_only, only the imports that run when it is imported (not those inside functions or TYPE_CHECKING)."""
    tree = ast.parse(source)
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "tinyrl" or base.startswith("tinyrl."):
                # `from tinyrl import budget` imports tinyrl.budget; `from tinyrl.budget import plan` tinyrl.budget
                out.update(f"{base}.{a.name}" if base == "tinyrl" else base for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tinyrl."))
    return out


def tinyrl_imports(path):
    """The top-level tinyrl modules and packages (stage names) the file at `path` imports."""
    name = module_name(path)
    found = imported_modules(open(path).read(), name, path.endswith("__init__.py"))
    return {m.split(".")[1] for m in found if m.count(".") >= 1}


def stage_files():
    """stage -> its files: one for a module, every .py of a package."""
    out = {}
    for entry in sorted(os.listdir(PKG)):
        full = os.path.join(PKG, entry)
        if entry.endswith(".py") and entry[:-3] not in WIRING:
            out[entry[:-3]] = [full]
        elif os.path.isfile(os.path.join(full, "__init__.py")):
            out[entry] = sorted(os.path.join(root, f) for root, _, files in os.walk(full) for f in files
                                if f.endswith(".py"))
    return out


def test_stage_modules_do_not_import_each_other():
    stages = stage_files()
    assert len(stages) >= 8 and PACKAGES <= set(stages)
    assert all(len(stages[p]) >= 3 for p in PACKAGES)  # the packages' files are scanned, not just __init__
    for stage, files in stages.items():
        for path in files:
            bad = tinyrl_imports(path) - SHARED - {stage}
            assert not bad, f"{os.path.relpath(path, PKG)} imports other stages {sorted(bad)}; wire them in loop.py"


def test_the_scan_sees_imports_into_packages_and_relative_ones():
    """The rule above is not vacuous: a file of a package importing another stage, however spelled, is caught."""
    name = "tinyrl.memory.store"
    assert imported_modules("from tinyrl.policy.scoring import completion_logprobs", name) == {"tinyrl.policy.scoring"}
    assert imported_modules("from ..budget import plan", name) == {"tinyrl.budget"}
    assert imported_modules("from ... import budget", "tinyrl.memory.deep.x") == {"tinyrl.budget"}
    assert imported_modules("from . import episode", name) == {"tinyrl.memory"}
    assert imported_modules("from .episode import MemoryState", "tinyrl.memory", is_package=True) == {
        "tinyrl.memory.episode"}
    assert imported_modules("import tinyrl.budget.search", name) == {"tinyrl.budget.search"}
    assert imported_modules("def f():\n    from tinyrl import loop", name) == {"tinyrl.loop"}
    assert imported_modules("def f():\n    from tinyrl import loop", name, top_level_only=True) == set()


def test_shared_modules_are_leaves():
    for leaf in ("errors", "hub", "decoding"):
        assert not tinyrl_imports(os.path.join(PKG, leaf + ".py")) - {"errors"}, leaf


def test_no_import_cycles():
    """Among the imports that run at import time, between every module of tinyrl (a package's files included)."""
    graph = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                graph[module_name(path)] = imported_modules(open(path).read(), module_name(path),
                                                            f == "__init__.py", top_level_only=True)
    assert {"tinyrl.budget.search", "tinyrl.policy", "tinyrl.memory", "tinyrl.loop"} <= set(graph)
    done, path = set(), []

    def visit(node):
        assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        if node in done or node not in graph:
            return
        path.append(node)
        for child in sorted(graph[node]):
            visit(child)
        path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_loop_is_readable_in_one_sitting():
    lines = open(os.path.join(PKG, "loop.py")).read().splitlines()
    assert len(lines) < 300
