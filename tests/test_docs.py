"""The docs build without warnings; the README's quick start and the docs' tour run."""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from pathlib import Path

import pytest

import bgf_pyg  # noqa: F401  (imported first, it silences PyG's import-time jit warnings)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def readme_section(title: str) -> str:
    """The text of README's ``## title`` section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def markdown_code(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def rst_code(path: Path) -> list[str]:
    """The ``.. code-block:: python`` blocks of a reST page, dedented."""
    blocks = re.findall(r"^\.\. code-block:: python\n\n((?:(?: {4}.*)?\n)+)",
                        path.read_text(encoding="utf-8"), re.M)
    return [textwrap.dedent(block) for block in blocks]


def normalise(code: str) -> str:
    """Code with blank lines dropped: a docs page may split code where the README has none."""
    return "\n".join(line.rstrip() for line in code.splitlines() if line.strip())


def run_code(code: str, name: str) -> str:
    """What ``code`` prints, run in a fresh namespace."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), {"__name__": "tour"})
    return out.getvalue()


def test_readme_quick_start_runs():
    (code,) = markdown_code(readme_section("Quick start"))
    printed = run_code(code, "README.md (Quick start)")
    assert "torch.Size([60, 128])" in printed
    assert re.search(r"'recall@1': \d", printed)


def test_docs_tour_runs():
    """The tour page's blocks, one after the other, as a reader runs them."""
    blocks = rst_code(DOCS / "tour.rst")
    assert len(blocks) >= 4
    printed = run_code("\n".join(blocks), "docs/tour.rst")
    assert re.search(r"'recall@1': \d", printed)


def test_readme_two_commands_and_the_ci_run_the_same_tests():
    """The README's two commands: the demo run of ``examples/cub.py`` and the test command,
    which ``.ci/run`` runs verbatim."""
    (block,) = re.findall(r"```bash\n(.*?)```", readme_section("Two commands"), re.S)
    main, tests = [line for line in block.splitlines() if line and not line.startswith("#")]
    setup = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && '
    assert main == setup + "python examples/cub.py"
    assert tests == setup + "python -m pytest"
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_pml_snippet_is_the_same_in_readme_and_docs():
    (readme,) = markdown_code(readme_section("Add BGFormer to your own training loop"))
    (docs,) = rst_code(DOCS / "pml_loop.rst")
    assert normalise(readme) == normalise(docs)


# Sphinx 9's napoleon uses a deprecated autodoc interface of Sphinx itself; nothing of ours.
@pytest.mark.filterwarnings("ignore:The mapping interface for autodoc options")
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="the docs need Sphinx (pip install -e '.[test]')")
    from sphinx.cmd.build import build_main

    # -W: every warning (a broken docstring, a missing reference target page) fails the build.
    status = build_main(["-W", "--keep-going", "-E", "-q", "-b", "html", str(DOCS),
                         str(tmp_path / "html")])
    assert status == 0
    assert "BatchGraphLoss" in (tmp_path / "html" / "api" / "losses.html").read_text("utf-8")


#: What the package's own text may not cite: files outside the repository.
FOREIGN_CITATIONS = re.compile(r"DESIGN\.md|DESIGN §|shared/research|papers\.md|reference_code\.md")


def test_the_package_cites_its_own_design_document():
    """Docstrings, help texts and presets cite ``docs/design.rst`` (in the toctree), never the
    design notes outside the repository, and every section they cite exists."""
    cited = set()
    for path in [*(ROOT / "bgf_pyg").rglob("*"), *(ROOT / "examples").rglob("*.py"),
                 *(ROOT / "benchmarks").rglob("*.py"), ROOT / "README.md"]:
        if path.is_file() and path.suffix in (".py", ".toml", ".md", ".rst"):
            text = path.read_text(encoding="utf-8")
            assert not FOREIGN_CITATIONS.search(text), path
            cited |= {int(n) for n in re.findall(r"docs/design\.rst`{0,2} §(\d+)", text)}
    design = (DOCS / "design.rst").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"^§(\d+) ", design, re.M)}
    assert cited and cited <= sections
    assert re.search(r"^   design$", (DOCS / "index.rst").read_text(encoding="utf-8"), re.M)
