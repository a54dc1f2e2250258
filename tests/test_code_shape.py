"""The code shape a maintainer meets first: one exception root with machine-readable codes,
no import cycles.  (Pure inspection of the package: no servers.)"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import visitflow
from visitflow import errors

PACKAGE_DIR = Path(visitflow.__file__).parent


def _module_names() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(visitflow.__path__, "visitflow.")
                  if not m.name.endswith("__main__"))


def _source_of(module: str) -> Path:
    rel = module.split(".")[1:]
    path = PACKAGE_DIR.joinpath(*rel)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


# ------------------------------------------------------------------ exceptions

def _error_classes() -> list[type]:
    return [obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, BaseException)]


def test_every_error_has_the_one_root_and_its_own_code():
    classes = _error_classes()
    assert len(classes) >= 25
    codes = {}
    for cls in classes:
        assert issubclass(cls, errors.VisitflowError), cls
        assert "code" in vars(cls), f"{cls.__name__} has no code of its own"
        assert cls.code not in codes, f"{cls.__name__} and {codes.get(cls.code)} share code {cls.code!r}"
        codes[cls.code] = cls.__name__


def test_the_tree_in_the_docstring_is_the_real_tree():
    """Each line ``Name [code]`` of the module docstring sits under its real parent."""
    lines = [line for line in errors.__doc__.splitlines() if "[" in line and "]" in line]
    stack: list[tuple[int, str]] = []
    seen = set()
    for line in lines:
        name = line.split("[")[0].replace("│", " ").replace("├──", "   ").replace("└──", "   ")
        depth, name = len(name) - len(name.lstrip()), name.strip()
        code = line.split("[")[1].split("]")[0]
        cls = getattr(errors, name)
        assert cls.code == code, name
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parent = getattr(errors, stack[-1][1])
            assert parent in cls.__bases__, f"{name} is drawn under {parent.__name__}"
        stack.append((depth, name))
        seen.add(cls)
    assert seen == set(_error_classes()), "every error class is in the docstring tree"


def test_no_exception_class_is_defined_outside_errors():
    for module in _module_names():
        tree = ast.parse(_source_of(module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                cls = getattr(importlib.import_module(module), node.name, None)
                if inspect.isclass(cls) and issubclass(cls, BaseException):
                    assert cls.__module__ == "visitflow.errors", f"{module}.{node.name} is defined outside errors"


@pytest.mark.parametrize("module, name", [
    ("visitflow.flow.engine", "RunAborted"), ("visitflow.flow.engine", "MissingField"),
    ("visitflow.flow.delegation", "DelegationExpired"), ("visitflow.core.tokens", "InvalidToken"),
    ("visitflow.core.oauth", "OAuthRefused"), ("visitflow.core.prefect_api", "PrefectUnavailable"),
    ("visitflow.flow.spec", "AnalysisDefinitionError"), ("visitflow.core.scopes", "ScopeError"),
])
def test_errors_stay_importable_where_they_are_raised(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_old_standard_bases_are_kept():
    assert issubclass(errors.RunNotFinished, TimeoutError)
    assert issubclass(errors.MissingField, KeyError)
    assert str(errors.MissingField("field 'saxs' is not in the run")) == "field 'saxs' is not in the run"
    assert issubclass(errors.ScopeError, ValueError)
    assert issubclass(errors.AnalysisDefinitionError, TypeError)
    assert errors.InvalidToken("token has expired", code="expired").code == "expired"
    assert errors.InvalidToken("x").code == "invalid_token"
    assert errors.InsufficientScope("x").status == 403


# ------------------------------------------------------------------ import cycles

def _imports(module: str) -> set[str]:
    """visitflow modules that ``module`` imports anywhere in its body (function-local imports
    count: a lazy import still closes a loop), except under ``if TYPE_CHECKING:``."""
    src = _source_of(module)
    is_pkg = src.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    tree = ast.parse(src.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    known = set(_module_names()) | {"visitflow"}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "visitflow")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[: len(base) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("visitflow"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != module}


def test_no_import_cycles():
    graph = {m: _imports(m) for m in _module_names() + ["visitflow"]}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_leaf_modules_import_nothing_of_visitflow_but_errors():
    assert _imports("visitflow.errors") == set()
    assert _imports("visitflow.flow.engine") <= {"visitflow.errors", "visitflow.core.outputs"}
