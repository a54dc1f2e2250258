"""The Tiled-internal names the server plug-ins rely on exist in the installed Tiled, and only
visitflow/tiled/tiled_compat.py reaches for them (pure inspection, no servers).

Run in the constrained install (``.ci/run``) and in the unconstrained one
(``.ci/run-unconstrained``): a Tiled upgrade that drops or reshapes one of these names fails
here, not in a Tiled server at the first request."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import visitflow
from visitflow.errors import TiledIncompatible, TiledVersionWarning
from visitflow.tiled import tiled_compat as compat

PACKAGE_DIR = Path(visitflow.__file__).parent
COMPAT = PACKAGE_DIR / "tiled" / "tiled_compat.py"

#: The public Tiled a visitflow module may import anywhere (the rule in tiled_compat's
#: docstring): these modules and their submodules, whole ...
PUBLIC_MODULES = (
    "tiled.client",                     # the client API: from_uri, Context, node classes
    "tiled.structures",                 # the data model client and server share
    "tiled.queries",                    # queries, e.g. AccessTagsFilter
    "tiled.adapters",                   # adapters, used as documented
    "tiled.server.protocols",           # what an authenticator implements
    "tiled.access_control.protocols",   # what an access policy implements (AccessPolicy, normalize_access_tags)
    "tiled.access_control.scopes",      # the scope names
)
#: ... and these names of otherwise internal modules.
PUBLIC_NAMES = {
    "tiled": {"__version__"},
    "tiled.access_control.access_policies": {"NO_ACCESS", "ALL_ACCESS", "ALL_SCOPES", "PUBLIC_SCOPES", "NO_SCOPES"},
}


def _fresh_lookup(entry):
    """The object ``entry`` names, looked up afresh (not through compat's own cache)."""
    obj = importlib.import_module(entry.module)
    for part in entry.name.split("."):
        assert hasattr(obj, part), f"{entry.qualname} is gone in tiled {compat.installed_tiled()}"
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("entry", compat.INTERNAL_NAMES, ids=lambda e: e.qualname)
def test_every_internal_name_exists_in_the_installed_tiled(entry):
    """Parameters included (in order where we pass them by position), and what we read in
    the source of the Tiled function that sets a run-time attribute."""
    obj = _fresh_lookup(entry)
    if entry.parameters:
        accepted = list(inspect.signature(obj).parameters)
        assert set(entry.parameters) <= set(accepted), f"{entry.qualname} takes {accepted}"
        if entry.positional:
            assert accepted[:len(entry.parameters)] == list(entry.parameters), accepted
    if entry.source_has:
        assert entry.source_has in inspect.getsource(obj), entry.qualname
    assert entry.why and not entry.why[0].isupper(), "why reads on from 'needed because it ...'"


def test_the_compat_module_hands_out_exactly_the_checked_objects():
    """Every name compat hands out is an object its import-time check resolved, and is Tiled's
    own: the principal overrides are keyed on the very functions Tiled's routes depend on."""
    assert set(compat._NAMES) == {e.qualname for e in compat.INTERNAL_NAMES}
    checked = [id(obj) for obj in compat._NAMES.values()]
    exported = [n for n in compat.__all__ if n not in {
        "TiledIncompatible", "TiledVersionWarning", "TESTED", "InternalName", "INTERNAL_NAMES", "installed_tiled",
        "is_tested", "resolve", "check", "at_risk"}]
    assert len(exported) == 25  # + parse_config_file (serve --config), SQLAdapter (sql_storage), SQLStorage (reconnect), ExternalPolicyDecisionPoint (opa_input), NoEntry (live_fence)
    for name in exported:
        assert id(getattr(compat, name)) in checked, f"{name} escapes the check"

    import tiled.authenticators
    import tiled.catalog.adapter
    import tiled.catalog.orm
    import tiled.config
    import tiled.server.app
    import tiled.server.authentication
    import tiled.server.connection_pool
    import tiled.server.schemas
    import tiled.server.settings
    import tiled.storage

    auth = tiled.server.authentication
    for name in ("oauth2_scheme", "get_api_key", "get_api_key_websocket", "get_decoded_access_token",
                 "get_decoded_access_token_websocket", "move_api_key", "get_current_principal",
                 "get_current_principal_websocket", "get_or_create_principal"):
        assert getattr(compat, name) is getattr(auth, name), name
    assert compat.get_database_session_factory is tiled.server.connection_pool.get_database_session_factory
    assert compat.get_settings is tiled.server.settings.get_settings
    schemas = tiled.server.schemas
    assert (compat.Principal, compat.PrincipalType, compat.Identity) == (
        schemas.Principal, schemas.PrincipalType, schemas.Identity)
    assert compat.ProxiedOIDCAuthenticator is tiled.authenticators.ProxiedOIDCAuthenticator
    assert compat.Config is tiled.config.Config
    assert compat.build_app_from_config is tiled.server.app.build_app_from_config
    assert (compat.AccessTag, compat.Node) == (tiled.catalog.orm.AccessTag, tiled.catalog.orm.Node)
    assert compat.CatalogNodeAdapter is tiled.catalog.adapter.CatalogNodeAdapter
    assert compat.SQLStorage is tiled.storage.SQLStorage


def test_the_authenticator_overrides_only_listed_members_of_its_tiled_base():
    """Each member VisitflowAuthenticator defines that its Tiled base also has is an override
    the compat list checks on the base (a member the base dropped would be dead code, one it
    renamed would silently stop being ours)."""
    from visitflow.tiled.authenticator import VisitflowAuthenticator

    base = compat.ProxiedOIDCAuthenticator
    overridden = {name for name in vars(VisitflowAuthenticator)
                  if hasattr(base, name) and not name.startswith("__")}
    # configuration_schema: how an authenticator documents its args to Tiled (public); _abc_impl: ABC's own
    overridden -= {"configuration_schema", "_abc_impl"}
    listed = {e.name.split(".", 1)[1] for e in compat.INTERNAL_NAMES
              if e.module == "tiled.authenticators" and "." in e.name}
    assert overridden, "the check sees the overrides"
    assert overridden == listed, (sorted(overridden), sorted(listed))


def test_a_missing_name_fails_clearly_with_every_name_and_why():
    gone = compat.InternalName("tiled.server.authentication", "get_no_such_principal", "looks a principal up")
    moved = compat.InternalName("tiled.server.no_such_module", "Thing", "does a thing")
    reshaped = compat.InternalName("tiled.server.schemas", "Principal", "is returned", ("no_such_field",))
    reordered = compat.InternalName("tiled.server.authentication", "get_current_principal", "is called",
                                    ("security_scopes", "request"), positional=True)
    rewritten = compat.InternalName("tiled.server.app", "build_app", "sets the provider",
                                    source_has="app.state.no_such_attribute =")
    with pytest.raises(TiledIncompatible) as info:
        compat.check(compat.INTERNAL_NAMES + (gone, moved, reshaped, reordered, rewritten), version="9.9.9")
    text = str(info.value)
    for name in ("tiled.server.authentication.get_no_such_principal", "tiled.server.no_such_module.Thing",
                 "no_such_field", "we pass (security_scopes, request) in that order",
                 "no longer contains 'app.state.no_such_attribute ='", "needed because it looks a principal up",
                 "tiled 9.9.9", compat.TESTED, "constraints.txt"):
        assert name in text, (name, text)
    assert text.count("\n  ") == 5, "only the broken names are listed"
    assert isinstance(info.value, ImportError) and info.value.code == "tiled_incompatible"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "VISITFLOW_STRICT_TILED"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**base, **env})


def test_a_tiled_without_a_name_stops_the_plugins_at_import():
    """The real import path: a Tiled whose ``get_or_create_principal`` is gone (deleted from the
    module before visitflow imports it) makes importing the principals plug-in — what Tiled does
    when it loads our config — fail with the name, the installed version and the tested range."""
    done = _run("import tiled.server.authentication as a; del a.get_or_create_principal\n"
                "import visitflow.tiled.principals\n")
    assert done.returncode != 0
    assert "visitflow.errors.TiledIncompatible" in done.stderr, done.stderr
    assert "tiled.server.authentication.get_or_create_principal is missing" in done.stderr, done.stderr
    assert f"tiled {compat.installed_tiled()} (tested: {compat.TESTED})" in done.stderr, done.stderr
    assert "principal cache misses" in done.stderr, "says why we need it"
    untouched = _run("import visitflow.tiled.principals, visitflow.tiled.access_policy, visitflow.tiled.server")
    assert untouched.returncode == 0, untouched.stderr
    assert "TiledVersionWarning" not in untouched.stderr, "the installed Tiled is a tested one"


def test_tested_range():
    assert compat.is_tested(compat.installed_tiled()), (
        f"constraints.txt installs tiled {compat.installed_tiled()}, outside compat.TESTED {compat.TESTED}: "
        "move TESTED with the constraints (after the unconstrained job passed)")
    assert compat.is_tested("0.2.20")
    assert not compat.is_tested("0.2.19") and not compat.is_tested("0.2.21") and not compat.is_tested("0.3.0")


def test_an_untested_tiled_warns_and_names_what_is_at_risk():
    """Import the module in a fresh interpreter that reports another Tiled version: it warns
    (the names are all there) with every name at risk; VISITFLOW_STRICT_TILED=1 makes it fatal."""
    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda d: '0.2.99' if d == 'tiled' else real(d); "
            "import visitflow.tiled.tiled_compat")
    warned = _run(code)
    assert warned.returncode == 0, warned.stderr
    assert "TiledVersionWarning" in warned.stderr and "tiled 0.2.99" in warned.stderr, warned.stderr
    for entry in compat.INTERNAL_NAMES:
        assert f"{entry.module}.{entry.name}" in warned.stderr
    strict = _run(code, VISITFLOW_STRICT_TILED="1")
    assert strict.returncode != 0 and "TiledIncompatible" in strict.stderr and "0.2.99" in strict.stderr
    assert issubclass(TiledVersionWarning, UserWarning)


# ------------------------------------------------------------------ who imports Tiled internals

def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def _is_public(module: str, name: str | None = None) -> bool:
    """``from module import name`` (or ``import module`` with ``name`` None) uses only public Tiled."""
    if name is not None and _is_module(f"{module}.{name}"):
        module, name = f"{module}.{name}", None  # from tiled.catalog import orm: the module tiled.catalog.orm
    if any(module == p or module.startswith(p + ".") for p in PUBLIC_MODULES):
        return True
    if name is None:
        # `import tiled` alone binds the package; what is reached through it is checked as attributes
        return module == "tiled"
    return name in PUBLIC_NAMES.get(module, ())


def _internal_tiled_uses(path: Path) -> list[str]:
    """``import tiled.x``, ``from tiled.x import y``, a string naming a Tiled module
    (``importlib.import_module("tiled.server.app")``, ``"tiled.catalog.adapter:Thing"``) and,
    in a module that binds the name ``tiled``, attribute chains ``tiled.x.y`` — each that is
    not public Tiled, anywhere in the file."""
    tree = ast.parse(path.read_text())
    binds_tiled = any(isinstance(n, ast.Import) and any(a.name.split(".")[0] == "tiled" and a.asname is None
                                                        for a in n.names) for n in ast.walk(tree))
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # judge chains whole
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            uses = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            uses = [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
            module, _, attr = node.value.partition(":")
            if not module.startswith("tiled.") or not _is_module(module):  # "tiled" (an audience), "tiled.yml"
                continue
            uses = [(module, attr.split(".")[0] or None)]
        elif binds_tiled and isinstance(node, ast.Attribute) and id(node) not in inner:
            parts = ast.unparse(node).split(".")
            if parts[0] != "tiled":
                continue
            # the longest prefix that is a module, and the attribute taken from it
            cut = max(i for i in range(1, len(parts) + 1) if _is_module(".".join(parts[:i])))
            uses = [(".".join(parts[:cut]), parts[cut] if cut < len(parts) else None)]
        else:
            continue
        for module, name in uses:
            if module.split(".")[0] != "tiled" or _is_public(module, name):
                continue
            found.append((node.lineno, module + (f" import {name}" if name else "") + f" (line {node.lineno})"))
    return [text for _line, text in sorted(found)]


def test_no_other_module_imports_tiled_internals():
    offenders = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path != COMPAT and (found := _internal_tiled_uses(path)):
            offenders[str(path.relative_to(PACKAGE_DIR.parent))] = found
    assert offenders == {}, f"Tiled internals belong in visitflow/tiled/tiled_compat.py: {offenders}"
    own = _internal_tiled_uses(COMPAT)
    assert len(own) >= 6, f"the check finds compat's own names (it would find others'): {own}"


def test_the_shape_check_catches_each_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from tiled.server.authentication import get_current_principal\n"
        "import tiled.catalog.orm\n"
        "from tiled.catalog import orm\n"                                     # a submodule by name
        "from tiled import config\n"
        "from tiled.access_control.access_policies import TagBasedAccessPolicy\n"
        "import importlib; importlib.import_module('tiled.server.app')\n"
        "ADAPTER = 'tiled.catalog.adapter:CatalogNodeAdapter'\n"
        "tiled.server.app.build_app_from_config({})\n"                       # through the bound package
        # public: fine
        "import tiled\n"
        "from tiled import __version__\n"
        "from tiled.client import from_uri\n"
        "import tiled.client.stream\n"
        "from tiled.structures.array import BuiltinDtype\n"
        "from tiled.queries import AccessTagsFilter\n"
        "from tiled.access_control.access_policies import NO_ACCESS\n"
        "from tiled.access_control.protocols import AccessPolicy, normalize_access_tags\n"
        "from tiled.server.protocols import ExternalAuthenticator\n"
        "from tiled import queries\n"
        "tiled.client.from_uri('http://x')\n"
        "AUDIENCE, CONFIG = 'tiled', 'tiled.yml'\n")
    found = _internal_tiled_uses(src)
    assert [f.rsplit(" (line ", 1)[1] for f in found] == [f"{n})" for n in range(1, 9)], found
