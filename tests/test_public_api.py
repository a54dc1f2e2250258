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
