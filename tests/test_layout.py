"""The package's layers: a module imports only from its own layer and those below it.

The order is the one the package docstring gives; each sub-package's docstring declares the layers it imports from
("Imports from: ..."), and the imports of its modules, lazy ones included, must keep to it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "modeling_mae"
LAYERS = ("model", "common", "data", "training", "interop", "evaluation", "loops", "studies")
TOP_LEVEL_LAYER = {"": "model", "configuration_mae": "model", "modeling_mae": "model", "errors": "common",
                   "arguments": "common", "text": "common"}
SUB_PACKAGES = LAYERS[2:]
MODULES = sorted(PACKAGE.rglob("*.py"))


def layer_of(module: str) -> str:
    """The layer of a dotted module under the package (`data.loader` -> data, `errors` -> common)."""
    head = module.split(".")[0]
    if head in TOP_LEVEL_LAYER:
        return TOP_LEVEL_LAYER[head]
    assert head in SUB_PACKAGES, f"modeling_mae.{module} belongs to no layer: add it to LAYERS"
    return head


def is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def imported_package_modules(source: str, package: tuple[str, ...]) -> set[str]:
    """The package modules that `source`, a module of sub-package `package` (() for the top), imports: relatively or
    by name, at the top or inside a function; `from . import x` names module x."""
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.removeprefix("modeling_mae.") for alias in node.names
                         if alias.name.startswith("modeling_mae.")}
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
            module = ".".join((*base, node.module) if node.module else base)
        elif node.module == "modeling_mae" or (node.module or "").startswith("modeling_mae."):
            module = node.module.removeprefix("modeling_mae").lstrip(".")
        else:
            continue
        imported.add(module)
        imported |= {f"{module}.{alias.name}".lstrip(".") for alias in node.names
                     if is_module(f"{module}.{alias.name}".lstrip("."))}
    return imported


def back_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of `source`, the package module `module` (dotted; a sub-package's `__init__` is named as the
    sub-package), that reach a higher layer than its own."""
    mine = LAYERS.index(layer_of(module))
    package = tuple(module.split(".")) if is_package else tuple(module.split(".")[:-1])
    return [f"modeling_mae.{module} ({LAYERS[mine]}) imports modeling_mae.{other} ({layer_of(other)})"
            for other in sorted(imported_package_modules(source, package))
            if LAYERS.index(layer_of(other)) > mine]


def dotted(path: pathlib.Path) -> str:
    """`data/loader.py` -> data.loader, `data/__init__.py` -> data, `__init__.py` -> "" (the package)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_every_import_goes_down_the_layers(path: pathlib.Path) -> None:
    assert back_imports(path.read_text(), dotted(path), is_package=path.name == "__init__.py") == []


def test_a_back_import_is_named() -> None:
    """The check itself, on a planted lazy import of the training layer into the data layer."""
    source = "def f():\n    from ..training.checkpoints import write_json\n"
    assert back_imports(source, "data.loader") == [
        "modeling_mae.data.loader (data) imports modeling_mae.training.checkpoints (training)"
    ]
    assert back_imports("from modeling_mae.evaluation import knn\n", "errors") == [
        "modeling_mae.errors (common) imports modeling_mae.evaluation (evaluation)",
        "modeling_mae.errors (common) imports modeling_mae.evaluation.knn (evaluation)",
    ]


def test_nothing_in_the_package_imports_a_script() -> None:
    for path in MODULES:
        tree = ast.parse(path.read_text())
        names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [name for name in names if name.split(".")[0] in ("run_scripts", "run_mae")], path


def declared_layers(sub_package: str) -> list[str]:
    docstring = ast.get_docstring(ast.parse((PACKAGE / sub_package / "__init__.py").read_text())) or ""
    lines = [line for line in docstring.splitlines() if line.startswith("Imports from: ")]
    assert len(lines) == 1, f"modeling_mae/{sub_package}/__init__.py must say which layers it imports from"
    return [name.strip() for name in lines[0].removeprefix("Imports from: ").rstrip(".").split(",")]


@pytest.mark.parametrize("sub_package", SUB_PACKAGES)
def test_each_sub_package_declares_the_layers_below_it(sub_package: str) -> None:
    assert declared_layers(sub_package) == list(LAYERS[: LAYERS.index(sub_package)])


def test_every_module_belongs_to_a_layer() -> None:
    for path in MODULES:
        layer_of(dotted(path))


def test_the_remote_code_pair_imports_only_each_other() -> None:
    assert imported_package_modules((PACKAGE / "configuration_mae.py").read_text(), ()) == set()
    assert imported_package_modules((PACKAGE / "modeling_mae.py").read_text(), ()) == {"configuration_mae"}


def test_fast_decode_is_below_transforms() -> None:
    assert "data.fast_decode" in imported_package_modules((PACKAGE / "data" / "transforms.py").read_text(), ("data",))
    assert imported_package_modules((PACKAGE / "data" / "fast_decode.py").read_text(), ("data",)) == set()
