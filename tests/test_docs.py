"""Every example in docs/ runs: the Python blocks of each page in order in one namespace (against the bundled
small model), and the `$ moejax plan` lines of the command-line page."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_docs_exist_and_link_nothing_outside_the_repository():
    names = {p.name for p in PAGES}
    assert {"README.md", "python-api.md", "cli.md", "http.md", "models.md", "benchmarks.md"} <= names
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)]+)\)", text):
            assert not target.startswith(("../", "/")) and (DOCS / target.split("#")[0]).exists(), (page, target)
        assert "shared/" not in text and "CONTRACT.md" not in text, page


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p.read_text(), "python")], ids=lambda p: p.name)
def test_python_examples_run(page):
    namespace: dict = {}
    for code in blocks(page.read_text(), "python"):
        exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - the docs' own examples


def test_plan_examples_run():
    lines = [ln[2:] for code in blocks((DOCS / "cli.md").read_text(), "console")
             for ln in code.splitlines() if ln.startswith("$ moejax plan")]
    assert len(lines) >= 3
    for line in lines:
        args = shlex.split(line)[1:]
        proc = subprocess.run([sys.executable, "-m", "moejax.cli", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (line, proc.stderr)
        assert "weights per device" in proc.stdout or '"weight_bytes_per_device"' in proc.stdout, line
