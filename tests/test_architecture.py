"""The package layout as a rule: imports point down the layers, no module imports itself back, sizes stay small.

Every import of every module counts (also one inside a function). A module may import its own
package's modules and any package of a lower layer; never a peer or a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "ar_lm"

BASE = ("ar_lm.config", "ar_lm.coerce", "ar_lm.errors", "ar_lm.io")
LAYERS = {  # component -> layer; a component imports only its own modules and lower layers
    "base": 0,
    "ar_lm.model": 1,
    "ar_lm.data": 1,
    "ar_lm.parallel": 2,
    "ar_lm.training": 3,
    "ar_lm.decoding": 4,
    "ar_lm.interop": 4,
    "ar_lm.plan": 5,
    "ar_lm.scaling": 6,
    "ar_lm.cli": 7,
    "ar_lm.__main__": 8,
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under package `root` (a package is its __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file. `from pkg import x` names the
    submodule pkg.x when there is one, else pkg itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    root = next(iter(modules)).split(".")[0]
    return {m for m in found if m in modules and m != name and m.split(".")[0] == root}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def component(name: str) -> str:
    if name in BASE:
        return "base"
    return ".".join(name.split(".")[:2])


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a peer or higher layer (or of a package no layer names)."""
    bad = []
    for src, targets in sorted(graph.items()):
        if src == "ar_lm":
            continue
        for dst in sorted(targets):
            a, b = component(src), component(dst)
            if a == b:
                continue
            if a not in LAYERS or b not in LAYERS or LAYERS[b] >= LAYERS[a]:
                bad.append(f"{src} -> {dst}")
    return bad


def oversized(root: Path) -> list[str]:
    out = []
    for name, path in module_files(root).items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            out.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name}: {length} lines")
    return out


# ---------------------------------------------------------------------------------------------
# The rules, on ar_lm itself


def test_no_import_cycles():
    assert cycles(import_graph(PACKAGE_ROOT)) == []


def test_imports_point_down_the_layers():
    assert layer_violations(import_graph(PACKAGE_ROOT)) == []


def test_every_package_is_in_a_layer_and_says_what_it_holds():
    modules = module_files(PACKAGE_ROOT)
    packages = {name for name, path in modules.items() if path.name == "__init__.py" and name != "ar_lm"}
    assert packages == {c for c in LAYERS if c.startswith("ar_lm.") and c not in ("ar_lm.cli", "ar_lm.__main__")}
    for name in packages:
        doc = ast.get_docstring(ast.parse(modules[name].read_text()))
        assert doc and "Imports" in doc, f"{name}/__init__.py must say what lives there and what it may import"
    top = {name for name, path in modules.items() if name.count(".") == 1 and path.name != "__init__.py"}
    assert top == set(BASE) | {"ar_lm.cli", "ar_lm.__main__"}


def test_modules_and_functions_stay_small():
    assert oversized(PACKAGE_ROOT) == []


# ---------------------------------------------------------------------------------------------
# The checker catches what it is there to catch


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "ar_lm" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "ar_lm"


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    # the two cycles the flat layout had: train <-> evaluate (evaluate imported train inside a function)
    root = _tree(tmp_path, {
        "__init__.py": "",
        "train.py": "from ar_lm.evaluate import evaluate\n",
        "evaluate.py": "def evaluate_run():\n    from ar_lm.train import restore\n",
        "fit.py": "def plot():\n    from ar_lm import plots\n",
        "plots.py": "from ar_lm import fit as fit_lib\n",
        "io.py": "",
    })
    assert cycles(import_graph(root)) == [["ar_lm.evaluate", "ar_lm.train"], ["ar_lm.fit", "ar_lm.plots"]]


def test_an_upward_or_sideways_import_is_found(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "config.py": "from ar_lm.errors import UserError\n",
        "errors.py": "",
        "model/__init__.py": "",
        "model/transformer.py": "def f():\n    from ar_lm.training.state import x\n",
        "data/__init__.py": "",
        "data/dataset.py": "from ar_lm.model import transformer\nfrom .. import config\n",
        "training/__init__.py": "",
        "training/state.py": "from ar_lm.model.transformer import f\nfrom ar_lm.config import C\n",
    })
    assert layer_violations(import_graph(root)) == [
        "ar_lm.data.dataset -> ar_lm.model.transformer",
        "ar_lm.model.transformer -> ar_lm.training.state",
    ]


def test_oversized_functions_are_found(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    root = _tree(tmp_path, {"__init__.py": "", "big.py": "def long():\n" + body})
    assert oversized(root) == [f"ar_lm.big.long: {MAX_FUNCTION_LINES + 1} lines"]


@pytest.mark.parametrize("old", ["ar_lm.config", "ar_lm.scaling", "ar_lm.decoding"])
def test_documented_import_paths_still_work(old):
    import importlib

    module = importlib.import_module(old)
    names = {"ar_lm.config": ("ExperimentConfig", "ModelConfig", "load_experiment"),
             "ar_lm.scaling": ("Sweep", "SweepPoint", "isoflop_sweep", "grid_sweep", "DataSpec", "ShapeRule"),
             "ar_lm.decoding": ("generate", "beam_search", "speculative_generate", "stream", "Sampling")}[old]
    assert all(callable(getattr(module, n)) for n in names)
