"""Dependencies point one way: no import cycle in nanogpt/ or kernels/, counting imports inside functions and
imports by name.

The imports are read from the source with `ast` (nothing is executed), so an import hidden in a function body,
which Python would only run later, counts as much as one at the top of the file; so does a module named in a
string, `importlib.import_module("kernels.gelu")` or a list of names a loop imports (kernels/inspect.py's MODULES)."""
import ast
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGES = ("nanogpt", "kernels")


def module_imports(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: the modules of `packages` it imports anywhere in its source}, for every .py file of packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name.split(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    base = ".".join([package] + ([base] if base else []))
                targets.add(base)
                # `from pkg import mod` imports the module pkg.mod
                targets.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # a string that is exactly a module's name: importlib.import_module("kernels.gelu"), or an entry of a
                # list of modules to load by name. (Prose that mentions a module, "python -m kernels.inspect", is
                # never exactly its name.)
                targets.add(node.value)
        # (a package's __init__.py re-exporting its modules is no cycle: the modules import their siblings)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a module importing itself), each a
    list of its modules in a cycle order."""
    index, low, on_stack, stack, result = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_no_import_cycles_in_the_project():
    cycles = find_cycles(module_imports(ROOT))
    assert not cycles, "import cycles (each group imports itself through the others): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_model_imports_only_the_backends_and_leaves():
    """model.py builds on backends (and the errors it raises, the GPU peak table it reads, the KV cache it owns,
    which imports nothing of the project); loaders and sampling
    build on it. GPT.from_pretrained and GPT.generate are thin entry points into modules that never import it."""
    graph = module_imports(ROOT)
    allowed = {"nanogpt", "nanogpt.backends", "nanogpt.errors", "nanogpt.hardware", "nanogpt.kv_cache",
               "nanogpt.pretrained", "nanogpt.generate"}
    assert graph["nanogpt.model"] <= allowed
    for entry_point in ("nanogpt.pretrained", "nanogpt.generate"):
        assert "nanogpt.model" not in graph[entry_point]
    for lower in ("nanogpt.checkpoint", "nanogpt.data", "nanogpt.runtime", "nanogpt.errors"):
        assert "nanogpt.model" not in graph[lower], f"{lower} is file I/O or setup: it must not build models"
    assert not any(m.startswith("nanogpt") for m in graph["kernels"]), "kernels/ must not import nanogpt/"


def write_package(root: Path, files: dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files,expected", [
    # a cycle through an import inside a function, the kind Python only runs later
    ({"nanogpt/__init__.py": "", "nanogpt/a.py": "import nanogpt.b\n",
      "nanogpt/b.py": "def f():\n    from nanogpt.a import x\n", "kernels/__init__.py": ""},
     [["nanogpt.a", "nanogpt.b"]]),
    # `from package import module`, three modules long
    ({"nanogpt/__init__.py": "", "nanogpt/a.py": "from nanogpt import b\n", "nanogpt/b.py": "from nanogpt.c import y\n",
      "nanogpt/c.py": "class K:\n    def m(self):\n        import nanogpt.a\n", "kernels/__init__.py": ""},
     [["nanogpt.a", "nanogpt.b", "nanogpt.c"]]),
    # relative imports, across the two packages
    ({"nanogpt/__init__.py": "", "nanogpt/a.py": "from kernels import k\n",
      "kernels/__init__.py": "", "kernels/k.py": "from .j import z\n", "kernels/j.py": "import nanogpt.a\n"},
     [["kernels.j", "kernels.k", "nanogpt.a"]]),
    # a cycle through importlib.import_module with the name written out
    ({"nanogpt/__init__.py": "", "nanogpt/a.py": "import nanogpt.b\n",
      "nanogpt/b.py": "import importlib\ndef f():\n    return importlib.import_module('nanogpt.a')\n",
      "kernels/__init__.py": ""},
     [["nanogpt.a", "nanogpt.b"]]),
    # the shape kernels/inspect.py had: it loads the modules of a list by name, one of them imports it back
    ({"nanogpt/__init__.py": "", "kernels/__init__.py": "",
      "kernels/inspect.py": "import importlib\nMODULES = ['kernels.k']\n"
                            "def collect():\n    return [importlib.import_module(m) for m in MODULES]\n",
      "kernels/k.py": "def inspect_cases():\n    from kernels.inspect import launch_case\n"},
     [["kernels.inspect", "kernels.k"]]),
    # a module named in prose is no import
    ({"nanogpt/__init__.py": "", "kernels/__init__.py": "", "kernels/inspect.py": "import kernels.k\n",
      "kernels/k.py": "'''compiled by kernels.inspect'''\nHELP = 'python -m kernels.inspect'\n"}, []),
    # a chain is no cycle
    ({"nanogpt/__init__.py": "", "nanogpt/a.py": "import nanogpt.b\n", "nanogpt/b.py": "import kernels.k\n",
      "kernels/__init__.py": "", "kernels/k.py": "import torch\n"}, []),
])
def test_the_cycle_finder_sees_a_planted_cycle(tmp_path, files, expected):
    write_package(tmp_path, files)
    assert find_cycles(module_imports(tmp_path)) == expected


def test_tests_import_helpers_never_other_test_files():
    """Shared test code lives in helpers.py (fixtures in conftest.py, which pytest loads by itself)."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name} imports {n}" for n in names if n.startswith(("test_", "conftest"))]
    assert not offenders, offenders


def test_the_real_inspect_module_closes_a_cycle_with_a_kernel_that_imports_it(tmp_path):
    """kernels/ as it is has no cycle; add to a kernel module an import of kernels.inspect inside a function (what
    attention, gelu, layer_norm and the loss head once did for launch_case) and the finder sees the cycle that
    inspect.py's MODULES list closes."""
    files = {f"kernels/{p.name}": p.read_text() for p in (ROOT / "kernels").glob("*.py")}
    files["nanogpt/__init__.py"] = ""
    write_package(tmp_path, files)
    assert find_cycles(module_imports(tmp_path)) == []
    files["kernels/gelu.py"] += "\n\ndef _inspect_back():\n    from kernels.inspect import ARCHS\n"
    write_package(tmp_path, files)
    assert find_cycles(module_imports(tmp_path)) == [["kernels.gelu", "kernels.inspect"]]


def test_no_other_installed_distribution_ships_a_kernels_package():
    """`kernels` is this project's import name; Hugging Face ships a package of the same name (transformers 5.25
    requires it), which makes transformers import ours in its place and fail. pyproject.toml keeps it out."""
    import importlib.metadata as md
    others = sorted({d.metadata["Name"] for d in md.distributions()
                     if d.metadata["Name"] and d.metadata["Name"].lower() != "nanogpt-kernels"
                     and "kernels" in (d.read_text("top_level.txt") or "").split()})
    others += [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"] == "kernels"]
    assert not others, f"installed distributions that also provide a top-level `kernels` package: {sorted(set(others))}"
