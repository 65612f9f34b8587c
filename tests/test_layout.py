"""The shape of the code: packages by stage and concept, docstrings everywhere, one-way imports.

These are the rules docs/architecture.md states; a test keeps each of them from eroding.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMON = ROOT / "common"
STAGE_SCRIPTS = {"stage1_profile_teacher", "stage2_distill", "stage3_evaluate"}
MODULES = sorted(p for p in COMMON.rglob("*.py") if "__pycache__" not in p.parts)

# common/ by stage and concept; plain modules are the shared pieces every stage uses.
PACKAGES = {
    "artifacts": {"layout", "discovery"},
    "cache": {"reader", "write"},
    "data": {"registry", "formats", "stream"},
    "export": {"__main__", "runner", "files", "record", "latency"},
    "layers": {"hooks", "tables", "pairing"},
    "profile": {"runner", "teacher", "stats", "manifest", "features", "forward_hooks", "student", "multi"},
    "quality": {"formulas", "stream", "table"},
    "report": {"runner", "stats", "tables", "text", "page", "exports", "published"},
    "study": {"__main__", "runner", "plan", "stats", "text", "multi"},
    "train": {"loop", "recipes", "distributed", "tracking", "teacher_source", "inputs", "streamed", "compiled", "multi_source", "multi_teacher"},
}
TOP_MODULES = {"alias", "checks", "cli", "config", "distill", "errors", "files", "method_spec", "plots", "registry", "runtime"}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_common_is_grouped_by_stage_and_concept() -> None:
    top = {p.stem for p in COMMON.glob("*.py") if p.stem != "__init__"}
    assert top == TOP_MODULES, "a new top-level module belongs in one of the packages (docs/architecture.md)"
    for package, modules in PACKAGES.items():
        found = {p.stem for p in (COMMON / package).glob("*.py") if p.stem != "__init__"}
        assert found == modules, package
        assert (COMMON / package / "__init__.py").is_file()


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_every_module_has_a_docstring(path: Path) -> None:
    tree = ast.parse(path.read_text())
    if path.name == "__init__.py" and not tree.body:
        return  # an empty package marker says nothing and needs nothing
    assert ast.get_docstring(tree), f"{_rel(path)} needs a docstring saying why it exists"


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "common":  # `from common import profile` imports the package common.profile
                names.update(f"common.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_module_under_common_imports_a_stage_script(path: Path) -> None:
    # Data flows one way: the stage scripts call common/, never the reverse.
    assert not _imported_modules(path) & STAGE_SCRIPTS


STAGE_PACKAGES = ("profile", "train", "report", "study", "export")


@pytest.mark.parametrize("path", sorted((COMMON / "artifacts").glob("*.py")), ids=_rel)
def test_the_artifacts_layout_imports_no_stage_package(path: Path) -> None:
    # The tree's layout sits below the stages that fill it: a stage imports the layout, never the
    # reverse (also inside a function), so no import loop runs through it.
    stages = {f"common.{name}" for name in STAGE_PACKAGES}
    found = {m for m in _imported_modules(path) if m in stages or m.startswith(tuple(f"{s}." for s in stages))}
    assert not found, f"{_rel(path)} imports the stage package(s) {sorted(found)}"


def test_every_import_of_common_names_an_existing_module() -> None:
    # The old flat paths (common.io, common.train as a module, ...) are gone; nothing may use them.
    for path in [*MODULES, *ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for module in _imported_modules(path):
            if module == "common" or not module.startswith("common."):
                continue
            parts = module.split(".")
            base = ROOT.joinpath(*parts)
            assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), f"{_rel(path)} imports {module}"


@pytest.mark.parametrize(
    "old, name",
    [
        ("common.quality", "layer_quality"),
        ("common.data", "load_data"),
        ("common.train", "fit"),
        ("common.profile", "run"),
        ("common.report", "run"),
        ("common.cache", "FeatureCache"),
        ("common.layers", "generalized_layers"),
        ("common.artifacts", "run_dir"),
        ("common.study", "main"),
        ("common.export", "export_all"),
    ],
)
def test_packages_keep_the_old_module_paths(old: str, name: str) -> None:
    import importlib

    package = importlib.import_module(old)
    assert callable(getattr(package, name)) and name in package.__all__ and name in dir(package)
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018  (the attribute access is the test)


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    "statement",
    [
        "import stage3_evaluate",
        "import common.report",
        "from common.report import run",
        "import common.report.runner, common.report.page, common.artifacts.discovery, common.study.text",
        "import common.runtime, common.files, common.artifacts",
    ],
)
def test_stage3_and_the_report_import_no_torch(statement: str) -> None:
    # Stage 3 runs on a laptop over copied artifacts: reading tables must not need torch.
    loaded = _modules_loaded_by(statement)
    assert "torch" not in loaded, f"`{statement}` imports torch"


def test_the_module_entry_points_run() -> None:
    for module in ("common.study", "common.export"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage:" in out.stdout, (module, out.stderr)


def test_the_installed_package_lists_every_package_under_common() -> None:
    # pyproject.toml installs common/ as `lfkd` (common/alias.py): a package missing from its list
    # would be missing from a non-editable install.
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"lfkd": "common"}
    found = {"lfkd" + "".join(f".{p}" for p in init.parent.relative_to(COMMON).parts) for init in COMMON.rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert set(config["packages"]) == found
    assert (ROOT / "common" / "report" / "published_cifar100.csv").is_file() and config["package-data"] == {"lfkd.report": ["*.csv"]}
