"""docs/BAD_INPUT.md: every row names a test, and every named test exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`(test_\w+\.py)::(test_\w+)(?:\[([\w-]+)\])?`")


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| input", "| event")) and "---" not in line]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_every_bad_input_row_names_tests_that_exist():
    rows = _rows((ROOT / "docs" / "BAD_INPUT.md").read_text())
    assert len(rows) > 40
    for row in rows:
        references = REFERENCE.findall(row)
        assert references, f"row without a test: {row}"
        for file, name, case in references:
            path = ROOT / "tests" / file
            assert path.is_file(), f"{file} named in {row!r} does not exist"
            assert name in _test_names(path), f"{file}::{name} does not exist"
            if case:
                assert f'"{case}"' in path.read_text(), f"{file}::{name}[{case}] has no such case"
