"""Stage modules talk through tinyrl.types / config / errors / hub (a leaf: is the hub reachable) only; loop.py
(training), evaluate.py (evaluation), trl.py (the TRL reward functions) and the CLI wire them."""

import ast
import os

import tinyrl

PKG = os.path.dirname(tinyrl.__file__)
SHARED = {"types", "config", "errors", "hub", "decoding"}  # decoding: policy's static decoding step, also a leaf
WIRING = {"loop", "evaluate", "cli", "trl", "__init__", "__main__"}


def tinyrl_imports(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tinyrl"):
            parts = node.module.split(".")
            names.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tinyrl."))
    return names


def test_stage_modules_do_not_import_each_other():
    stages = [f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f[:-3] not in WIRING]
    assert len(stages) >= 8
    for stage in stages:
        bad = tinyrl_imports(os.path.join(PKG, stage + ".py")) - SHARED
        assert not bad, f"tinyrl/{stage}.py imports other stages {sorted(bad)}; wire them in loop.py"


def test_shared_modules_are_leaves():
    for leaf in ("errors", "hub", "decoding"):
        assert not tinyrl_imports(os.path.join(PKG, leaf + ".py")) - {"errors"}, leaf


def test_loop_is_readable_in_one_sitting():
    lines = open(os.path.join(PKG, "loop.py")).read().splitlines()
    assert len(lines) < 300
