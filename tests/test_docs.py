"""The documentation site (docs/) builds with warnings as errors, and the README's links and test
command agree with the repository."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    """A broken link or cross-reference, a page in no toctree, an include of a missing file or a
    docstring autodoc cannot import is a warning, and `-W` makes it fail the build."""
    if importlib.util.find_spec("sphinx") is None:
        pytest.fail("Sphinx is not installed: install the docs extra (pip install -e '.[docs]').")
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(out)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    for page in ("index", "moe_layer", "notebooks/quickstart", "api/generated/moe_jax.routing"):
        assert (out / f"{page}.html").exists(), page


def test_readme_links_into_the_docs_resolve():
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert links, "the README links into docs/"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def _test_command(path: pathlib.Path) -> str:
    section = path.read_text().split("Install and run the tests", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _test_command(README)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    assert ci == command, f".ci/run runs {ci!r}, the README says {command!r}"
    docs = _test_command(ROOT / "docs" / "getting_started.md")
    assert docs == command, f"docs/getting_started.md says {docs!r}, the README {command!r}"
