"""The layers hold (the library knows no web, the service no command line), and the CLI loads lazily.

reprmerge_core (library) <- service (web) <- reprmerge_cli (command line), reprmerge_bench (benchmarks).
Imports inside functions count too: a lazy import still ties the packages together.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprmerge_cli import COMMANDS

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
    source = ("import os\ndef run():\n    from service.engine import Engine\n    import reprmerge_bench.serve\n"
              "from . import x\n")
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


def _fresh_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`reprmerge ARGS` in a fresh interpreter, then the names of the heavy libraries it had imported."""
    code = ("import sys\nfrom reprmerge_cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nheavy = ('torch', 'transformers', 'service')\n"
            "print('HEAVY', sorted(m for m in heavy if m in sys.modules))\nsys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


def test_help_lists_every_subcommand_without_loading_torch() -> None:
    result = _fresh_cli("--help")
    assert result.returncode == 0, result.stderr
    for name, _, text in COMMANDS:
        assert name in result.stdout and text in result.stdout
    assert "HEAVY []" in result.stdout


def test_a_subcommands_help_shows_its_options_with_defaults() -> None:
    result = _fresh_cli("calibrate", "--help")
    assert result.returncode == 0, result.stderr
    assert "--pooling {mean,cls,pooler}" in result.stdout and "--shard I/N" in result.stdout
    assert "HEAVY []" in result.stdout


def test_inspect_validates_without_torch(random_bundle: Path) -> None:
    result = _fresh_cli("inspect", str(random_bundle))
    assert result.returncode == 0, result.stderr
    assert "sha256 verified" in result.stdout and "VALID" in result.stdout and "HEAVY []" in result.stdout
    heads = random_bundle / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:-8] + b"\xff" * 8)  # damaged: the hash no longer matches
    result = _fresh_cli("inspect", str(random_bundle))
    assert result.returncode == 1 and "heads.safetensors: sha256 mismatch" in result.stderr
