"""The layout is the architecture (docs/architecture.md): imports point down the layers, and no two
modules import each other, directly or through others. Both are checked on the installed package."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_layers_contract_holds():
    """import-linter's `layers` contract of pyproject.toml: cli > reports > training > data > contracts > core."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is missing: pip install -e '.[dev]' installs import-linter")
    done = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_no_module_imports_one_that_imports_it():
    graph = grimp.build_graph("entclip", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            # A package's __init__ re-exporting its own modules is not a cycle of the design.
            if imported.startswith(module + ".") or module.startswith(imported + "."):
                continue
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append(" -> ".join(graph.find_shortest_chain(importer=imported, imported=module)))
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_layers_are_the_packages_the_contract_names():
    """Every module of entclip sits in one of the six layers, or is one of the public aliases."""
    layers = ("core", "contracts", "data", "training", "reports", "cli")
    top = {p.stem for p in (ROOT / "entclip").glob("*.py")}
    assert top == {"__init__", "__main__", "theory", "losses"}, sorted(top)
    packages = {p.name for p in (ROOT / "entclip").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(layers)
