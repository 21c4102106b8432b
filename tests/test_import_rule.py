"""Imports run one way: offline -> bundle -> service, both on `sidrec/` (docs/internals.md).

Read from the source (ast), so an import inside a function, under TYPE_CHECKING or through
importlib counts as much as one at the top: no module under service/ imports sidrec.offline,
none under offline/ imports sidrec.service, model/ imports neither, and of sidrec/ only the
composition root, cli.py, may import both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> (the package its modules are in, top-level packages it must not import)
RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "service": ("sidrec.service", ("sidrec.offline",)),
    "offline": ("sidrec.offline", ("sidrec.service",)),
    "model": ("sidrec.model", ("sidrec.offline", "sidrec.service")),
    "sidrec": ("sidrec", ("sidrec.offline", "sidrec.service")),
}
COMPOSITION_ROOTS = {Path("sidrec/cli.py")}


def _package(path: Path, folder: str) -> str:
    """The dotted package a module file is in (service/routers/x.py -> sidrec.service.routers)."""
    base = RULES[folder][0]
    parts = path.relative_to(ROOT / folder).parent.parts
    return ".".join([base, *parts])


def imported_names(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, dotted name) of everything the module imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # level 1 is the module's own package (an __init__.py's too)
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.append((node.lineno, module))
            # `from sidrec import offline` imports sidrec.offline
            names += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                called in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                names.append((node.lineno, first.value))
    return names


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for folder, (_, forbidden) in RULES.items():
        for path in sorted((root / folder).rglob("*.py")):
            if path.relative_to(root) in COMPOSITION_ROOTS:
                continue
            for line, name in imported_names(path, _package(path, folder)):
                for banned in forbidden:
                    if name == banned or name.startswith(banned + "."):
                        found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


def test_imports_run_one_way() -> None:
    assert violations() == []


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    # The scan itself: each of these would break the rule, wherever it sits in the module.
    cases = {
        "import sidrec.offline.pipeline": "sidrec.offline.pipeline",
        "from sidrec.offline.data.dataset import DataError": "sidrec.offline.data.dataset",
        "from sidrec import offline": "sidrec.offline",
        "from ..offline import demo": "sidrec.offline",
        "def f():\n    from sidrec.offline.data import load": "sidrec.offline.data",
        "if TYPE_CHECKING:\n    from sidrec.offline.data.dataset import Interactions": (
            "sidrec.offline.data.dataset"
        ),
        "import importlib\nimportlib.import_module('sidrec.offline.pipeline')": (
            "sidrec.offline.pipeline"
        ),
    }
    module = tmp_path / "module.py"
    for source, name in cases.items():
        module.write_text(source + "\n")
        seen = [n for _, n in imported_names(module, "sidrec.service")]
        assert name in seen, (source, seen)
    module.write_text("from .history_store import HistoryStore\nfrom sidrec.bundle import x\n")
    assert not [
        n for _, n in imported_names(module, "sidrec.service") if n.startswith("sidrec.offline")
    ]


@pytest.mark.parametrize("folder", sorted(RULES))
def test_every_folder_is_scanned(folder: str) -> None:
    assert list((ROOT / folder).rglob("*.py")), folder
