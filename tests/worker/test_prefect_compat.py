"""The private Prefect names the warm worker relies on exist in the installed Prefect, and
only visitflow/worker/prefect_compat.py reaches for them (pure inspection, no servers).

Run in the constrained install (``.ci/run``) and in the unconstrained one
(``.ci/run-unconstrained``): a Prefect upgrade that drops or reshapes one of these names
fails here, not in production."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import visitflow
from visitflow.errors import PrefectIncompatible, PrefectVersionWarning
from visitflow.worker import prefect_compat as compat

PACKAGE_DIR = Path(visitflow.__file__).parent
COMPAT = PACKAGE_DIR / "worker" / "prefect_compat.py"
PREFECT_PACKAGES = ("prefect", "prefect_kubernetes", "prefect_redis")


@pytest.mark.parametrize("entry", compat.PRIVATE_NAMES + compat.UNDERSCORE_ATTRIBUTES, ids=lambda e: e.qualname)
def test_every_private_name_exists_in_the_installed_prefect(entry):
    """Looked up afresh (not through the module's own cache), parameters included."""
    module = importlib.import_module(entry.module)
    obj = module
    for part in entry.name.split("."):
        assert hasattr(obj, part), f"{entry.qualname} is gone in prefect {compat.installed_prefect()}"
        obj = getattr(obj, part)
    if entry.parameters:
        import inspect

        accepted = inspect.signature(obj).parameters
        assert set(entry.parameters) <= set(accepted), f"{entry.qualname} takes {list(accepted)}"


def test_the_compat_module_lists_every_private_name_it_uses():
    """Every private name the compat module hands out comes from the checked list: nothing it uses
    escapes the check (and the worker code runs on exactly these objects)."""
    listed = {e.qualname for e in compat.PRIVATE_NAMES}
    used = {node.slice.value for node in ast.walk(ast.parse(COMPAT.read_text()))
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "_NAMES"}
    assert used and used <= listed, used - listed
    import prefect.engine
    from prefect.runner import _process_manager

    assert compat.ProcessHandle is _process_manager.ProcessHandle
    assert compat._NAMES["prefect.engine._drive_run_flow_result"] is prefect.engine._drive_run_flow_result


def test_a_missing_name_fails_clearly_with_every_name_and_why():
    gone = compat.PrivateName("prefect.engine", "_no_such_helper", "drives the flow")
    moved = compat.PrivateName("prefect.runner._no_such_module", "Thing", "does a thing")
    reshaped = compat.PrivateName("prefect.runner._flow_run_executor", "FlowRunExecutorContext.create_executor",
                                  "builds executors", ("no_such_parameter",))
    with pytest.raises(PrefectIncompatible) as info:
        compat.check(compat.PRIVATE_NAMES + (gone, moved, reshaped), version="9.9.9")
    text = str(info.value)
    for name in ("prefect.engine._no_such_helper", "prefect.runner._no_such_module.Thing", "no_such_parameter",
                 "drives the flow", "9.9.9", compat.TESTED, "`process` worker type"):
        assert name in text, (name, text)
    assert "FlowRunExecutorContext\n" not in text and text.count("\n  ") == 3, "only the broken names are listed"
    assert isinstance(info.value, ImportError) and info.value.code == "prefect_incompatible"


def test_tested_range():
    assert compat.is_tested(compat.installed_prefect()), (
        f"constraints.txt installs prefect {compat.installed_prefect()}, outside compat.TESTED {compat.TESTED}: "
        "move TESTED with the constraints (after the unconstrained job passed)")
    assert compat.is_tested("3.9.1") and compat.is_tested("3.9.7")
    assert not compat.is_tested("3.8.8") and not compat.is_tested("3.10.0") and not compat.is_tested("4.0.0")


def test_an_untested_prefect_warns_and_names_what_is_at_risk():
    """Import the module in a fresh interpreter that reports another Prefect version: it
    warns (the names are all there) with every name at risk; VISITFLOW_STRICT_PREFECT=1 makes it fatal."""
    import os

    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda d: '3.99.0' if d == 'prefect' else real(d); "
            "import visitflow.worker.prefect_compat")
    env = {k: v for k, v in os.environ.items() if k != "VISITFLOW_STRICT_PREFECT"}
    warned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert warned.returncode == 0, warned.stderr
    assert "PrefectVersionWarning" in warned.stderr and "prefect 3.99.0" in warned.stderr
    for entry in compat.PRIVATE_NAMES:
        assert entry.qualname in warned.stderr
    strict = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**env, "VISITFLOW_STRICT_PREFECT": "1"})
    assert strict.returncode != 0 and "PrefectIncompatible" in strict.stderr and "3.99.0" in strict.stderr
    assert issubclass(PrefectVersionWarning, UserWarning)


def _private_prefect_imports(path: Path) -> list[str]:
    """``import prefect._x``, ``from prefect.a._b import y``, ``from prefect.a import _y``, or a
    dotted string naming one (``importlib.import_module("prefect._x")``), anywhere in the
    file; prefect_kubernetes and prefect_redis too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            pairs = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            pairs = [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
            pairs = [(node.value, None)]
        else:
            continue
        for module, name in pairs:
            parts = module.split(".")
            if parts[0] not in PREFECT_PACKAGES:
                continue
            if any(p.startswith("_") and p != "__main__" for p in parts) or (name or "").startswith("_"):
                found.append(module + (f" import {name}" if name else "") + f" (line {node.lineno})")
    return found


def test_no_other_module_imports_private_prefect_names():
    offenders = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path != COMPAT and (found := _private_prefect_imports(path)):
            offenders[str(path.relative_to(PACKAGE_DIR.parent))] = found
    assert offenders == {}, f"private Prefect names belong in visitflow/worker/prefect_compat.py: {offenders}"
    assert _private_prefect_imports(COMPAT), "the check finds compat's own names (it would find others')"


def test_the_shape_check_catches_each_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import prefect._internal.metrics\n"
                   "from prefect.runner._process_manager import ProcessHandle\n"
                   "from prefect.engine import _drive_run_flow_result\n"
                   "from prefect_kubernetes._logging import x\n"
                   "import importlib; importlib.import_module('prefect._internal.control_listener')\n"
                   "from prefect.engine import handle_engine_signals\n"       # public: fine
                   "import prefect.flow_engine\n")                             # public: fine
    assert len(_private_prefect_imports(src)) == 5, _private_prefect_imports(src)


@pytest.mark.parametrize("module", ["worker/__init__.py", "blocks.py"])
def test_subclasses_of_prefect_classes_read_no_private_attribute_they_did_not_set(module):
    """``self._logger`` on Prefect's worker is private (the worker uses Prefect's public
    ``get_worker_logger``); an underscore attribute read on ``self`` must be one the module
    sets itself (``self._zygote``, or a class attribute such as the documented ``_description``)."""
    tree = ast.parse((PACKAGE_DIR / module).read_text())
    ours = {t.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    ours |= {t.id for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef) for node in cls.body
             if isinstance(node, (ast.Assign, ast.AnnAssign))
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    methods = {node.name for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef) for node in cls.body
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    ours |= methods
    read = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "self" and node.attr.startswith("_") and not node.attr.startswith("__")}
    assert read - ours == set(), f"{module} reads Prefect's private {sorted(read - ours)}"
    documented = {e.name.split(".")[1] for e in compat.UNDERSCORE_ATTRIBUTES}
    set_here = {name for name in ours - methods if name.startswith("_") and not name.startswith("__")} - read
    assert set_here <= documented | {"_zygote"}, f"{module} sets underscore attributes not listed in compat: {set_here}"
