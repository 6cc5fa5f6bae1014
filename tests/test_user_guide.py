"""The README stays a user guide: short, its measurements in docs/RESULTS.md, every benchmark indexed.

What a reader sees must make sense without this project's machine or tracker:
no ``../shared`` paths and no bare issue numbers (``#18``) in the README or in
docs/RESULTS.md.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "RESULTS.md"
BENCHMARKS = ROOT / "benchmarks"
MAX_README_LINES = 500
ISSUE = re.compile(r"(?<![\w/&])#\d+\b")  # "#18", "issue #5"; not "&#39;" nor a URL's fragment


def test_the_readme_is_at_most_500_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move measurements to docs/RESULTS.md "
        "and details to docs/")


def test_the_results_and_the_benchmark_index_exist():
    assert RESULTS.is_file()
    assert (BENCHMARKS / "README.md").is_file()
    assert "docs/RESULTS.md" in README.read_text(), "the README links its results summary to docs/RESULTS.md"


def _benchmark_files() -> list[str]:
    return sorted(p.name for p in BENCHMARKS.iterdir()
                  if p.is_file() and p.name != "README.md" and not p.name.startswith("."))


def test_every_benchmark_script_is_named_in_the_benchmark_index():
    files = _benchmark_files()
    assert files, "no benchmark scripts found"
    index = (BENCHMARKS / "README.md").read_text()
    missing = [name for name in files if f"`{name}`" not in index]
    assert not missing, f"benchmarks/README.md does not name {missing}"


@pytest.mark.parametrize("path", [README, RESULTS], ids=["README.md", "RESULTS.md"])
def test_no_paths_or_issue_numbers_a_reader_cannot_follow(path):
    text = path.read_text()
    assert "../shared" not in text, f"{path.name} names a ../shared path"
    assert "ANCHORS.md" not in text, f"{path.name} names ANCHORS.md, which is not in the repository"
    issues = [m.group(0) for m in ISSUE.finditer(text)]
    assert not issues, f"{path.name} refers to issue numbers {issues}"


def test_the_issue_pattern_finds_what_it_should():
    assert ISSUE.findall("that issue #18 asks for; see #5.") == ["#18", "#5"]
    assert not ISSUE.findall("[Tests](#tests), x&#39;s, https://github.com/o/r/issues/6035, a/#3")
