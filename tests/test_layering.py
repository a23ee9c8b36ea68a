"""The packages depend one way: porting builds jaxgpt models; jaxgpt's library reaches neither
porting nor torch (only its CLI modules do, where a checkpoint or torch is the subject)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import importlib, pkgutil, sys
import jaxgpt
names = sorted(m.name for m in pkgutil.walk_packages(jaxgpt.__path__, "jaxgpt.")
               if not m.name.rsplit(".", 1)[-1].startswith("cli"))
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("porting", "torch"))
print(len(names), loaded[:5])
"""


def test_importing_the_library_loads_neither_porting_nor_torch():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-2000:]
    count, loaded = done.stdout.split(" ", 1)
    assert int(count) >= 15  # every library module was imported
    assert loaded.strip() == "[]"


def imported_roots(path: str) -> set[str]:
    """Top-level packages a file imports anywhere (module level or inside functions)."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_library_module_imports_porting_or_torch_even_lazily():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "jaxgpt")):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, ROOT)
            if name.endswith(".py") and not name.startswith("cli"):
                if imported_roots(path) & {"porting", "torch"}:
                    offenders.append(relative)
    assert offenders == []
