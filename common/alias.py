"""This package under a second import name, `lfkd`, so that it cannot clash with a user's own `common`.

The repository keeps its `common/` directory (the stage scripts and the tests import `common`),
but `common` is a name many projects use: a `common/` in a user's working directory, or another
installed package of that name, would shadow ours, or ours theirs. `pip install -e .` therefore
installs this directory as `lfkd` only (pyproject.toml maps `lfkd` to `common/`), and no package
called `common` reaches the user's environment.

Every module here imports its siblings absolutely (`from common.quality import ...`). Loaded as
`lfkd`, each module's source is compiled with those imports pointing at `lfkd` instead
(`rewrite`), the way pytest rewrites test modules' asserts: an import statement of `common` or
`common.<x>`, and a string that is exactly such a module path (`importlib.import_module`), are
renamed, nothing else. So `import lfkd` works beside anyone's `common`, and both can be loaded in
one process. The files are compiled from source each time (a bytecode cache would be the one
that `common` writes for the same file); that costs about a second once per process.
"""
from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from pathlib import Path
from types import CodeType, ModuleType
from typing import Sequence

SOURCE_NAME = "common"
_MODULE_PATH = re.compile(rf"{SOURCE_NAME}(\.[A-Za-z_]\w*)*")


def _renamed(name: str, alias: str) -> str:
    return alias + name[len(SOURCE_NAME):] if name == SOURCE_NAME or name.startswith(SOURCE_NAME + ".") else name


class _Rename(ast.NodeTransformer):
    """`common` -> `alias` in import statements and in strings that are module paths."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.ImportFrom:
        if node.level == 0 and node.module:
            node.module = _renamed(node.module, self.alias)
        return node

    def visit_Import(self, node: ast.Import) -> ast.AST | list[ast.stmt]:
        binds_source = False
        for item in node.names:
            if item.asname is None and (item.name == SOURCE_NAME or item.name.startswith(SOURCE_NAME + ".")):
                binds_source = True  # `import common.x` binds the name `common`: bind it to the alias too
            item.name = _renamed(item.name, self.alias)
        if not binds_source:
            return node
        rebind = ast.Assign(targets=[ast.Name(SOURCE_NAME, ast.Store())], value=ast.Name(self.alias, ast.Load()))
        return [node, ast.copy_location(rebind, node)]

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        if isinstance(node.value, str) and _MODULE_PATH.fullmatch(node.value):
            node.value = _renamed(node.value, self.alias)
        return node


def rewrite(source: bytes | str, path: str, alias: str) -> CodeType:
    """The module's code with its imports of `common` pointing at `alias` (module docstring)."""
    tree = _Rename(alias).visit(ast.parse(source, filename=path))
    return compile(ast.fix_missing_locations(tree), path, "exec", dont_inherit=True)


class _Loader(importlib.abc.SourceLoader):
    """Loads one file of this directory under the alias, never through a bytecode cache."""

    def __init__(self, alias: str, fullname: str, path: str) -> None:
        self.alias, self.fullname, self.path = alias, fullname, path

    def get_filename(self, fullname: str) -> str:
        return self.path

    def get_data(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def source_to_code(self, data: bytes, path: str, *, _optimize: int = -1) -> CodeType:  # type: ignore[override]
        return rewrite(data, path, self.alias)

    def get_code(self, fullname: str) -> CodeType:
        return self.source_to_code(self.get_data(self.path), self.path)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds `alias.<x>` under this directory (first in sys.meta_path, so the standard finder,
    which would load the file unrewritten, never sees these names)."""

    def __init__(self, alias: str, root: Path) -> None:
        self.alias, self.root = alias, root

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(self.alias + "."):
            return None
        base = self.root.joinpath(*fullname.split(".")[1:])
        package = base / "__init__.py"
        if package.is_file():
            loader = _Loader(self.alias, fullname, str(package))
            return importlib.util.spec_from_file_location(fullname, package, loader=loader, submodule_search_locations=[str(base)])
        module = base.with_suffix(".py")
        if module.is_file():
            return importlib.util.spec_from_file_location(fullname, module, loader=_Loader(self.alias, fullname, str(module)))
        return None


def install(alias: str, root: Path) -> None:
    """Make the submodules of the package `alias` (this directory, `root`) load rewritten. Called
    by `common/__init__.py` when it is imported under a name other than `common`."""
    if not any(isinstance(f, _Finder) and f.alias == alias for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(alias, Path(root)))
