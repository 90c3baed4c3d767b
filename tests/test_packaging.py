"""Packaging: every third-party module ar_lm imports is declared, and extras hold only what they serve."""

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports(root: Path) -> set[str]:
    found = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "ar_lm"}


def _distributions(module: str) -> set[str]:
    """The installed distributions that provide `module` (its own name when none is installed)."""
    dists = metadata.packages_distributions().get(module) or [module]
    return {d.lower().replace("_", "-") for d in dists}


def test_every_imported_module_is_declared():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = {name: {_name(r) for r in reqs} for name, reqs in PYPROJECT["optional-dependencies"].items()}
    declared = core | set().union(*extras.values())
    missing = sorted(m for m in _third_party_imports(REPO / "ar_lm") if not _distributions(m) & declared)
    assert missing == []


def test_hf_extra_holds_only_what_ar_lm_imports():
    hf = {_name(r) for r in PYPROJECT["optional-dependencies"]["hf"]}
    imported = set().union(*(_distributions(m) for m in _third_party_imports(REPO / "ar_lm")))
    assert hf <= imported and not hf & {"torch", "transformers"}


def test_wheel_ships_the_cpu_kernel_sources(tmp_path):
    """A built (non-editable) wheel holds every C++ file `cpu_kernels` compiles on first use."""
    import shutil
    import subprocess
    import zipfile

    from ar_lm.model import cpu_kernels

    shutil.copytree(REPO / "ar_lm", tmp_path / "src" / "ar_lm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / "src" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w",
                    str(tmp_path / "dist")], cwd=tmp_path / "src", check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("ar_lm-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    needed = {f"ar_lm/model/{p.name}" for p in (*cpu_kernels.SOURCES, cpu_kernels.HEADER)}
    assert len(needed) == 3 and needed <= shipped, needed - shipped
