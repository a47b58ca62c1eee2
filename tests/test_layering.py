"""The layers hold: the library knows no web, the service no command line, read from every import statement.

reprmerge_core (library) <- service (web) <- reprmerge_cli (command line), reprmerge_bench (benchmarks).
Imports inside functions count too: a lazy import still ties the packages together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "reprmerge_core": {"service", "reprmerge_cli", "reprmerge_bench"},
    "service": {"reprmerge_cli", "reprmerge_bench"},
}


def imported_packages(source: str, package: str) -> set[str]:
    """Top-level packages imported anywhere in `source`, a module of `package` (for relative imports)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level > 0:
                found.add(package)  # a relative import never leaves its own top-level package
    return found


def test_import_walk_sees_function_level_and_relative_imports() -> None:
    source = "import os\ndef run():\n    from service.engine import Engine\n    import reprmerge_bench.serve\nfrom . import x\n"
    assert imported_packages(source, "reprmerge_core") == {"os", "service", "reprmerge_bench", "reprmerge_core"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_the_layers_above_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found under {package}"
    offenders = []
    for path in files:
        found = imported_packages(path.read_text(), package) & FORBIDDEN[package]
        if found:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(found)}")
    assert not offenders, "\n".join(offenders)
