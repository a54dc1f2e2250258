"""``__all__`` on every module, guarded (as httpx guards its own): what a module defines in
public is exported, what it exports exists.  Pure inspection, no servers."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import visitflow

PACKAGE_DIR = Path(visitflow.__file__).parent
MODULES = ["visitflow"] + sorted(m.name for m in pkgutil.walk_packages(visitflow.__path__, "visitflow.")
                                 if not m.name.endswith("__main__"))


def _source_of(module: str) -> Path:
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


#: Modules whose ``__all__`` is empty on purpose, and why.
EMPTY_ON_PURPOSE = {
    # blueapi registers every name in an env.sources module's __all__ as a plan.
    "visitflow.trigger.blueapi_hook",
}


@pytest.mark.parametrize("module", MODULES)
def test_all_lists_exactly_the_public_definitions(module):
    mod = importlib.import_module(module)
    exported = getattr(mod, "__all__", None)
    assert isinstance(exported, list), f"{module} has no __all__"
    if module in EMPTY_ON_PURPOSE:
        assert exported == [], module
        return
    assert len(exported) == len(set(exported)), f"{module}.__all__ repeats a name"
    for name in exported:
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which it does not have"
    tree = ast.parse(_source_of(module).read_text())
    defined = {n.name for n in tree.body
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")}
    missing = defined - set(exported)
    assert not missing, f"{module} defines {sorted(missing)} in public but does not export them"


def test_the_analyst_api_is_at_the_top():
    assert "analysis" in visitflow.__all__
    from visitflow.flow.builder import analysis

    assert visitflow.analysis is analysis


# ------------------------------------------------------------------ the public API, pinned

#: The import paths the README, docs/, flows/, blocks/ and deployments/ use, and exactly what
#: each exports.  Everything else is internal (its package's docstring says so) and may move.
PUBLIC = {
    "visitflow": ["analysis", "read_result"],
    "visitflow.options": ["Options"],
    "visitflow.blocks": ["RunAccess", "ScopedCredentials", "save"],
    "visitflow.testing": ["CheckReport", "MemoryRun", "MemorySink", "assert_check", "check", "load_analyses",
                          "load_recorded", "spec_of", "synthetic_data"],
    "visitflow.trigger": ["AnalysisTrigger", "TriggerSettings", "subscribe_for", "uses_analyses"],
    "visitflow.errors": None,  # every exception class, and nothing else (tests/test_code_shape.py)
}
#: Modules a facility names in configuration rather than imports (blueapi's env.sources).
PUBLIC_BY_NAME = {"visitflow.trigger.blueapi_hook"}
INTERNAL_PACKAGES = ["visitflow.core", "visitflow.flow", "visitflow.tiled", "visitflow.token_service",
                     "visitflow.worker", "visitflow.stack", "visitflow.production"]


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_modules_export_exactly_the_pinned_names(module):
    mod = importlib.import_module(module)
    if PUBLIC[module] is None:
        import inspect

        classes = sorted(n for n, o in vars(mod).items() if inspect.isclass(o) and issubclass(o, BaseException)
                         and o.__module__ == module)
        assert sorted(mod.__all__) == classes
        return
    assert sorted(mod.__all__) == sorted(PUBLIC[module])
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_public_faces_are_the_implementations():
    """A face re-exports, it does not wrap: one owner per concept."""
    from visitflow.flow import builder, credentials, sink
    from visitflow.flow import testing as impl_testing

    import visitflow.blocks
    import visitflow.options
    import visitflow.testing
    from visitflow.core import options as impl_options

    assert visitflow.analysis is builder.analysis and visitflow.read_result is sink.read_result
    assert visitflow.blocks.ScopedCredentials is credentials.ScopedCredentials
    assert visitflow.options.Options is impl_options.Options
    assert visitflow.testing.check is impl_testing.check


@pytest.mark.parametrize("package", INTERNAL_PACKAGES)
def test_internal_packages_say_so(package):
    doc = importlib.import_module(package).__doc__ or ""
    assert "internal" in doc.lower(), f"{package}'s docstring does not say it is internal"


def _documented_imports() -> set[str]:
    """Every ``visitflow`` module that a user-facing file imports from."""
    repo = PACKAGE_DIR.parent
    files = [repo / "README.md", *sorted((repo / "docs").glob("*.md")), *sorted((repo / "flows").glob("*.py")),
             *sorted((repo / "blocks").glob("*.py")), *sorted((repo / "blocks").glob("*.md")),
             *sorted((repo / "deployments").rglob("*.py"))]
    found = set()
    import re

    for f in files:
        for m in re.finditer(r"^\s*(?:from\s+(visitflow[\w.]*)\s+import|import\s+(visitflow[\w.]*))", f.read_text(), re.M):
            found.add(m.group(1) or m.group(2))
    return found


def test_docs_flows_and_blocks_import_only_public_paths():
    used = _documented_imports()
    assert used, "found no documented import at all: the scan is broken"
    assert used <= set(PUBLIC), f"user-facing files import internal paths: {sorted(used - set(PUBLIC))}"


def test_public_by_name_modules_exist_and_are_light():
    for name in PUBLIC_BY_NAME:
        assert _source_of(name).exists()
