"""The code shape a maintainer meets first: one exception root with machine-readable codes,
no import cycles, folders that import only what their process may (docs/architecture.md).  (Pure inspection of the package: no servers.)"""

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


def test_errors_are_exported_only_by_visitflow_errors():
    """One exception root, one import path: no module re-exports an error in its ``__all__``
    (the modules that raise them import them from :mod:`visitflow.errors` like everyone)."""
    names = {cls.__name__ for cls in _error_classes()}
    offenders = {}
    for module in _module_names() + ["visitflow"]:
        if module == "visitflow.errors":
            continue
        exported = set(getattr(importlib.import_module(module), "__all__", ())) & names
        if exported:
            offenders[module] = sorted(exported)
    assert offenders == {}, offenders


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


# ------------------------------------------------------------------ folders by process

#: Each top-level folder of visitflow/ runs in one kind of process; what it may import of
#: visitflow (besides itself).  ``None``: anything (operator programs: they start the others).
FOLDER_RULES = {
    "core": {"errors"},                                   # light: every process, blueapi's too
    "trigger": {"errors", "core"},                        # inside blueapi
    "flow": {"errors", "core"},                           # inside a flow run
    "tiled": {"errors", "core"},                          # inside Tiled's server
    "token_service": {"errors", "core"},                  # the token service's own process
    "worker": {"errors", "core"},                         # the Prefect worker (and its zygote)
    "stack": None,                                        # `visitflow up/down/demo`, tests
    "production": None,                                   # generators, HA lab, grant hygiene
}
#: Top-level modules: the public faces and the console script.
TOP_LEVEL_RULES = {
    "visitflow": {"flow"},                                # lazy: analysis, read_result
    "visitflow.errors": set(),
    "visitflow.options": {"core"},
    "visitflow.blocks": {"flow"},
    "visitflow.testing": {"flow"},
    "visitflow.cli": set(),                               # sub-commands by name, on demand
}


def _folder(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "visitflow"
    if (PACKAGE_DIR / parts[1]).is_dir():
        return parts[1]
    return parts[1] if len(parts) == 2 and parts[1] == "errors" else module


def folder_violations(graph: dict[str, set[str]]) -> list[str]:
    """``module -> folder`` edges that the rules above forbid."""
    bad = []
    for module, targets in graph.items():
        folder = _folder(module)
        if folder in FOLDER_RULES:
            allowed = FOLDER_RULES[folder]
            if allowed is None:
                continue
            allowed = allowed | {folder}
        else:
            allowed = TOP_LEVEL_RULES.get(module)
            assert allowed is not None, f"{module}: a top-level module the rules do not know (add it, or move it into a folder)"
            allowed = allowed | {"errors"}
        for target in targets:
            tf = _folder(target)
            tf = "errors" if target == "visitflow.errors" else tf
            if tf not in allowed and target != "visitflow":
                bad.append(f"{module} imports {target} ({folder} may import {sorted(allowed)})")
            if target == "visitflow" and module.startswith("visitflow."):
                bad.append(f"{module} imports the package root (its lazy attributes load flow/)")
    return sorted(bad)


def _graph() -> dict[str, set[str]]:
    return {m: _imports(m) for m in _module_names() + ["visitflow"]}


def test_every_folder_is_known_and_imports_only_what_its_process_may():
    folders = {p.name for p in PACKAGE_DIR.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FOLDER_RULES), "a folder of visitflow/ has no rule (or a rule has no folder)"
    assert folder_violations(_graph()) == []


def test_the_folder_rule_catches_a_forbidden_import():
    """The rule above is not vacuous: the imports that the reorganisation removed are caught."""
    graph = _graph()
    graph["visitflow.flow.spec"] = graph["visitflow.flow.spec"] | {"visitflow.flow.builder"}  # allowed: same folder
    graph["visitflow.core.scopes"] = graph["visitflow.core.scopes"] | {"visitflow.flow.spec"}
    graph["visitflow.tiled.cli"] = graph["visitflow.tiled.cli"] | {"visitflow.stack.local"}
    graph["visitflow.trigger.callback"] = graph["visitflow.trigger.callback"] | {"visitflow.tiled.authenticator"}
    assert folder_violations(graph) == [
        "visitflow.core.scopes imports visitflow.flow.spec (core may import ['core', 'errors'])",
        "visitflow.tiled.cli imports visitflow.stack.local (tiled may import ['core', 'errors', 'tiled'])",
        "visitflow.trigger.callback imports visitflow.tiled.authenticator (trigger may import ['core', 'errors', 'trigger'])",
    ]


def test_a_forbidden_import_put_back_in_a_file_fails(tmp_path, monkeypatch):
    """End to end through the AST reader: a function-local import written into a copy of a
    core module is found (lazy imports count) and refused."""
    src = _source_of("visitflow.core.scopes").read_text() + "\n\ndef _sneak():\n    from ..flow import spec\n"
    fake = tmp_path / "scopes.py"
    fake.write_text(src)
    real = _source_of
    monkeypatch.setitem(globals(), "_source_of", lambda m: fake if m == "visitflow.core.scopes" else real(m))
    assert "visitflow.flow.spec" in _imports("visitflow.core.scopes")
    assert any(v.startswith("visitflow.core.scopes imports visitflow.flow.spec") for v in folder_violations(_graph()))


def test_the_light_distribution_is_core_trigger_and_errors():
    import tomllib

    repo = PACKAGE_DIR.parent
    config = tomllib.loads((repo / "visitflow-trigger" / "pyproject.toml").read_text())
    shipped = config["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert shipped == {
        "../visitflow/__init__.py": "visitflow/__init__.py",
        "../visitflow/errors.py": "visitflow/errors.py",
        "../visitflow/core": "visitflow/core",
        "../visitflow/trigger": "visitflow/trigger",
    }


#: What the light folders may import at module level besides the standard library: all of it
#: is in blueapi's environment already (tests/trigger/test_blueapi.py installs it there).
LIGHT_THIRD_PARTY = {"httpx", "jwt", "pydantic", "jsonschema", "yaml"}
#: The trigger runs inside blueapi, so blueapi's own RunEngine packages are there for it too
#: (``uses_analyses`` is a bluesky plan decorator); core must not need them.
TRIGGER_ALSO = {"bluesky", "event_model"}


def test_light_folders_import_only_light_packages_at_module_level():
    import sys

    heavy = {}
    for module in _module_names():
        if _folder(module) not in ("core", "trigger") and module != "visitflow.errors":
            continue
        tree = ast.parse(_source_of(module).read_text())
        for node in tree.body:  # module level only: functions may import more, on use
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in LIGHT_THIRD_PARTY or top in ("visitflow", "__future__"):
                    continue
                if _folder(module) == "trigger" and top in TRIGGER_ALSO:
                    continue
                heavy.setdefault(module, []).append(name)
    assert heavy == {}, heavy
