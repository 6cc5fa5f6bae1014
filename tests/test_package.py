"""The shape of the package: small modules, public names that do not hide modules, no import cycle."""

import ast
import types
from pathlib import Path

import pytest

import cstar

ROOT = Path(cstar.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (ROOT.parent / relative).with_suffix(".py").exists() or (ROOT.parent / relative / "__init__.py").exists()


def imports(path: Path) -> set[str]:
    """The cstar modules that ``path`` imports, at module level or inside functions."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cstar"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] != "cstar":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule, not pkg's other names
                found.add(f"{source}.{alias.name}" if is_module(f"{source}.{alias.name}") else source)
    return found - {me}


def test_no_public_name_hides_a_module():
    hidden = [name for name in cstar.__all__ if is_module(f"cstar.{name}")
              and not isinstance(getattr(cstar, name), types.ModuleType)]
    assert hidden == []


def test_no_import_cycle_between_cstar_modules():
    graph = {module_name(p): imports(p) for p in ROOT.rglob("*.py")}
    # a package's __init__ re-exports its modules; a module reaching its own package's __init__ is
    # therefore a cycle too, so such edges stay in the graph
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_every_module_reads_in_one_sitting():
    long = {module_name(p): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


SHIMS = {"train": "cstar.training.fit", "admm": "cstar.pipeline.admm", "serialize": "cstar.files.serialize",
         "counting": "cstar.evaluation.counting", "compressors": "cstar.pipeline.compressors",
         "report": "cstar.pipeline.report"}


def test_the_top_of_the_package_holds_few_modules():
    """The folder tree is the architecture: at most 8 modules at the top besides the entry points and shims."""
    top = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "__main__", "_version"} - set(SHIMS)
    assert len(top) <= 8, sorted(top)


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_a_moved_modules_old_name_still_imports_with_a_warning(old):
    import importlib
    import sys

    sys.modules.pop(f"cstar.{old}", None)
    with pytest.warns(FutureWarning, match=SHIMS[old]):
        module = importlib.import_module(f"cstar.{old}")
    assert module is importlib.import_module(SHIMS[old])


def test_benchmarks_use_only_the_public_api():
    """No benchmark imports a private module (``cstar._*``, ``cstar.<package>._*``), a private name, or the tests."""
    private = []
    for path in sorted((ROOT.parent / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules, names = [a.name for a in node.names], []
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules, names = [node.module or ""], [a.name for a in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "tests" or (parts[0] == "cstar" and any(p.startswith("_") for p in parts[1:])) \
                        or (parts[0] == "cstar" and any(n.startswith("_") for n in names)):
                    private.append(f"{path.name} {module}")
    # the one exception: gpu_check's "float16_unscaled" ablation switches off the private gradient rescaling
    # to show on a GPU what that rescaling prevents (it measures the library's inside, by design)
    assert private == ["gpu_check.py cstar.attacks._gradient"]


def test_pytest_keeps_only_the_temp_folders_of_failed_tests():
    import tomllib

    options = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["tmp_path_retention_policy"] == "failed"
