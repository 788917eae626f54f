"""The package's module graph: lower layers never import higher ones."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "modeling_mae"


def imported_package_modules(module: str) -> set[str]:
    """The `modeling_mae` modules that `modeling_mae/{module}.py` imports (relatively or by name), anywhere in it."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("modeling_mae")):
            imported.add((node.module or "").removeprefix("modeling_mae").lstrip(".") or "__init__")
    return imported


def test_fast_decode_is_below_transforms() -> None:
    assert "fast_decode" in imported_package_modules("transforms")
    assert imported_package_modules("fast_decode") == set()
