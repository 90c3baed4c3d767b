"""The documentation: the site builds with `mkdocs build --strict`, every relative link and image in the
README and docs/ resolves (file and heading anchor), the generated reference pages are current, and the
README's quickstart runs exactly as written and ends with a fitted sweep.

`test_readme_quickstart_runs_as_written` is the slow one (about 2 minutes on 2 cores: a dataset, a run,
its evaluation, generation and a 6-point sweep with its fit); it runs in CI like every other test.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
import gen_reference as docs_reference  # noqa: E402  (docs/gen_reference.py)

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_mkdocs_build_strict(tmp_path):
    # mkdocs-material comes with the test-core extra (and the docs extra); CI has it, so no skip here
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()


def _slug(heading: str) -> str:
    """The anchor GitHub and mkdocs' toc give a heading (ASCII text, the cases these pages use)."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"\s", "-", text.strip())


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def _links(page: Path):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # nor inline code
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        yield m.group(1)


def test_relative_links_resolve():
    """Every relative link and image in README.md and docs/**.md names a file that exists (and, for a
    markdown page, a heading that exists); pages under docs/ stay inside docs/ (the site's root)."""
    bad = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
                continue  # http(s):, mailto: ...
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: {target}"
            if not dest.exists():
                bad.append(f"{where}: no such file")
            elif page.is_relative_to(REPO / "docs") and not dest.is_relative_to(REPO / "docs"):
                bad.append(f"{where}: outside docs/ (the site cannot link it)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{where}: no heading with anchor #{anchor}")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_generated_reference_is_current():
    stale = docs_reference.stale()
    assert not stale, (f"{', '.join(stale)} differ from what the code gives now: run "
                       f"`{docs_reference.REGENERATE}` and commit the result")


def test_cli_reference_names_every_command_and_option():
    from ar_lm.cli import build_parser

    text = docs_reference.cli_markdown()
    commands = list(docs_reference._subparsers(build_parser()))
    assert len(commands) >= 10
    for name, _, sub in commands:
        assert f"## `ar-lm {name}`" in text, name
        for a in sub._actions:
            for opt in set(a.option_strings) - {"-h", "--help"}:
                assert f"`{opt}" in text or f", {opt}" in text, (name, opt)


def test_config_reference_names_every_field_and_rule():
    from ar_lm import config as C

    text = docs_reference.config_markdown()
    keys = C.all_keys(C.ExperimentConfig())
    assert keys and all(f"| `{k}` |" in text for k in keys if "." in k)
    for key, (what, _) in C.FIELD_RULES.items():
        assert docs_reference._cell(what) in text, key
    for key, allowed in C.CHOICES.items():
        assert all(f"`{c}`" in text for c in allowed), key



def test_commands_at_a_glance_lists_every_command():
    from ar_lm.cli import COMMANDS

    text = (REPO / "docs" / "reference" / "commands.md").read_text()
    assert [c for c in COMMANDS if f"(cli.md#ar-lm-{c})" not in text] == []

def test_quickstart_is_the_same_in_readme_and_site():
    site = (REPO / "docs" / "index.md").read_text()
    assert docs_reference.quickstart_script() in site, \
        "docs/index.md's quickstart block differs from the README's: copy the README's block"



@pytest.mark.parametrize("module, page", [("ar_lm.training.rundir", "run-directory.md"),
                                          ("ar_lm.data.dataset", "dataset-directory.md")])
def test_directory_pages_name_every_file_the_code_writes(module, page):
    """The layout in the module's docstring (what the code writes) is on the reference page."""
    names = re.findall(r"^ {4}(?:RUN_DIR/)?([\w./<>-]+)", importlib.import_module(module).__doc__, re.M)
    text = (REPO / "docs" / "reference" / page).read_text()
    assert len(names) >= 5 and [n for n in names if n not in text] == [], names

def test_readme_quickstart_runs_as_written(tmp_path):
    """Slow (about 2 minutes on 2 cores). The README's quickstart block, unchanged, in a fresh directory with a
    copy of experiments/, `ar-lm` from this interpreter's environment first on PATH."""
    script = docs_reference.quickstart_script()
    assert "ar-lm sweep experiments/quickstart.py" in script
    shutil.copytree(REPO / "experiments", tmp_path / "experiments")
    env = {**os.environ, "WANDB_MODE": "offline",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert (tmp_path / "runs" / "quickstart" / "summary.json").is_file()
    summary = (tmp_path / "sweeps" / "quickstart" / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 6, summary  # header + the 6 points
    fit = json.loads((tmp_path / "sweeps" / "quickstart" / "fit" / "fit.json").read_text())
    fitted = [k for k in ("approach1", "approach2", "approach3") if fit.get(k)]
    assert fitted, sorted(fit)
    assert "N_opt" in out.stdout + out.stderr or "approach" in out.stdout + out.stderr
