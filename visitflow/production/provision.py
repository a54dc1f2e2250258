"""``visitflow provision``: make a facility's servers match its session list, idempotently.

The session list is the user office's document that OPA's data bundle is made of
(``deployments/opa/data.json``'s shape: ``facility.subjects``, ``.proposals``, ``.beamlines``
and ``.sessions[visit] = {proposal, beamline, members, analysts, analyses}``), so one file
says who may do what (OPA) and what exists (Tiled, Prefect).  From it this command makes:

* **Tiled** — each session's ``<store>/<visit>`` containers, created by the admin through
  Tiled's API, so the server's policy tags them (``visitflow:<store>:<visit>``,
  :mod:`visitflow.tiled.node_tags`) like any other node (docs/architecture.md §5);
* **Prefect** — the global concurrency limit ``visitflow-live-<visit>`` that a visit's live
  runs share (docs/architecture.md §2); ``visitflow up`` makes its limits here too (one owner);
* **OPA** — a bundle (``data.json`` + ``.manifest``, and the policy files given with
  ``--policy``) that OPA's bundle plug-in downloads (``services``/``bundles`` config) or
  ``opa run --bundle`` loads.  Its manifest's roots are the four ``facility`` trees and each
  policy's package, so OPA refuses a bundle that would overwrite anything else.

Running it again changes nothing (every item reported ``unchanged``).  A session missing
from the list loses its limit and its OPA entry (no new analyses, no access); its Tiled data
stays — deleting data is not provisioning's decision.  A bad list is refused before anything
is touched, naming the line and the field (:class:`~visitflow.errors.ConfigError`).

Hand-rolled: OPA ships no library for writing bundles (``opa build`` needs the binary and a
directory); a bundle is a gzipped tar with two JSON files, written here deterministically so
an unchanged list gives a byte-identical file (and the same ``revision``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from ..core.layout import Layout
from ..core.prefect_api import PrefectAPI
from ..core.scopes import valid_name
from ..errors import ConfigError

__all__ = ['LIMIT_PREFIX', 'BUNDLE_ROOTS', 'Session', 'SessionList', 'Report', 'load_sessions',
           'parse_sessions', 'policy_sources', 'template_values', 'visit_paths', 'provision_tiled', 'provision_limits', 'provision_bundle', 'provision',
           'add_arguments', 'run']

#: Live runs of visit ``v`` share the Prefect global concurrency limit ``visitflow-live-v``.
LIMIT_PREFIX = "visitflow-live-"
#: What the bundle owns in OPA's data tree (``facility.tiled`` is a policy package: not ours).
BUNDLE_ROOTS = ("facility/beamlines", "facility/proposals", "facility/sessions", "facility/subjects")
SESSION_FIELDS = {"proposal", "beamline", "members", "analysts", "analyses", "live_limit"}
DEFAULT_LIVE_LIMIT = 4

Say = Callable[[str], None]


@dataclass(frozen=True)
class Session:
    visit: str
    proposal: str
    beamline: str
    live_limit: int


@dataclass
class SessionList:
    """A validated session list: the document as given (for OPA) and its sessions."""

    document: dict
    sessions: dict[str, Session]


@dataclass
class Report:
    """What one run did, item by item (``tiled:raw/a1``, ``limit:a1``, ``opa:a1``)."""

    items: dict[str, str] = field(default_factory=dict)   # item -> created/updated/removed/unchanged

    def add(self, item: str, outcome: str, say: Say, detail: str = "") -> None:
        self.items[item] = outcome
        say(f"{item}: {outcome}{f' ({detail})' if detail else ''}")

    def counts(self) -> Counter:
        return Counter(self.items.values())

    def summary(self) -> str:
        c = self.counts()
        return (f"{c['created']} created, {c['updated']} updated, {c['removed']} removed, "
                f"{c['unchanged']} unchanged")


# ---------------------------------------------------------------------------- the session list

def _line_of(text: str, path: list) -> Optional[int]:
    """The line where ``path``'s last key appears, found by walking the keys in order
    (a search, not a parser: good enough to point a person at the place)."""
    pos, found = 0, False
    for key in path:
        if not isinstance(key, str):
            continue
        m = re.compile(r'"%s"\s*:' % re.escape(key)).search(text, pos)
        if m is None:
            break
        pos, found = m.start(), True
    return text.count("\n", 0, pos) + 1 if found else None


def _dotted(path: list) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def parse_sessions(text: str, source: str = "<sessions>") -> SessionList:
    """Validate a session list (JSON text) completely before anything is provisioned.

    Raises :class:`ConfigError` whose message is ``source:line: field: what is wrong`` for
    the first problem found."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}:{exc.lineno}: not JSON: {exc.msg} (column {exc.colno})") from None

    def fail(path: list, what: str):
        line = _line_of(text, path)
        raise ConfigError(f"{source}:{line if line else 1}: {_dotted(path) or 'top level'}: {what}")

    def obj(value, path):
        if not isinstance(value, dict):
            fail(path, f"must be an object, not {type(value).__name__}")
        return value

    def names(value, path, known: Mapping, known_as: str) -> list[str]:
        if not isinstance(value, list):
            fail(path, f"must be a list of names, not {type(value).__name__}")
        for i, name in enumerate(value):
            if not isinstance(name, str) or not name:
                fail(path + [i], f"must be a non-empty string, not {name!r}")
            if known is not None and name not in known:
                fail(path + [i], f"{name!r} is not in {known_as}")
        return value

    obj(doc, [])
    if "facility" not in doc:
        fail([], 'has no "facility" object (the shape of deployments/opa/data.json)')
    facility = obj(doc["facility"], ["facility"])
    for part in ("subjects", "proposals", "beamlines", "sessions"):
        if part not in facility:
            fail(["facility"], f'has no "{part}"')
        obj(facility[part], ["facility", part])
    subjects, proposals, beamlines = facility["subjects"], facility["proposals"], facility["beamlines"]
    for bl, info in beamlines.items():
        obj(info, ["facility", "beamlines", bl])
        names(info.get("staff", []), ["facility", "beamlines", bl, "staff"], subjects, "facility.subjects")
    sessions: dict[str, Session] = {}
    for visit, info in facility["sessions"].items():
        at = ["facility", "sessions", visit]
        if not valid_name(visit):
            fail(at, "is not a usable visit name (letters, digits, '.', '_', '-')")
        obj(info, at)
        unknown = sorted(set(info) - SESSION_FIELDS)
        if unknown:
            fail(at + [unknown[0]], f"unknown field (a session has {', '.join(sorted(SESSION_FIELDS))})")
        for key in ("proposal", "beamline", "members", "analysts", "analyses"):
            if key not in info:
                fail(at, f'has no "{key}"')
        if info["proposal"] not in proposals:
            fail(at + ["proposal"], f"{info['proposal']!r} is not in facility.proposals")
        if info["beamline"] not in beamlines:
            fail(at + ["beamline"], f"{info['beamline']!r} is not in facility.beamlines")
        members = names(info["members"], at + ["members"], subjects, "facility.subjects")
        analysts = names(info["analysts"], at + ["analysts"], subjects, "facility.subjects")
        for i, who in enumerate(analysts):
            if who not in members:
                fail(at + ["analysts", i], f"{who!r} is not a member of the session (analysts write results)")
        for i, name in enumerate(names(info["analyses"], at + ["analyses"], None, "")):
            if not valid_name(name):
                fail(at + ["analyses", i], f"{name!r} is not a usable analysis name")
        limit = info.get("live_limit", DEFAULT_LIVE_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            fail(at + ["live_limit"], f"must be a whole number of live runs >= 1, not {limit!r}")
        sessions[visit] = Session(visit, info["proposal"], info["beamline"], limit)
    return SessionList(doc, sessions)


def load_sessions(path: Path | str) -> SessionList:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the session list: {exc.strerror}") from None
    return parse_sessions(text, str(path))


# ---------------------------------------------------------------------------- Tiled

def template_values(session: Session) -> dict[str, str]:
    """What a layout may place before ``{visit}``: blueapi's ``{instrument}/{proposal}/{visit}``
    takes the session's beamline and proposal (the default ``raw/{visit}`` needs neither)."""
    return {"instrument": session.beamline, "proposal": session.proposal}


def visit_paths(layout: Layout, session: Session) -> list[str]:
    """The session's visit containers, one per store."""
    return [t.prefix(**template_values(session), visit=session.visit) for t in layout.templates()]


def provision_tiled(uri: str, auth, sessions: Iterable[Session], report: Report, say: Say = print, *,
                    layout: Optional[Layout] = None) -> None:
    """Each session's visit containers (their tags set by Tiled's policy on creation)."""
    from ..core.tiled_admin import ensure_visits

    layout = layout or Layout()
    for session in sessions:
        created = set(ensure_visits(uri, auth, [session.visit], layout=layout, extra=template_values(session)))
        for path in visit_paths(layout, session):
            report.add(f"tiled:{path}", "created" if path in created else "unchanged", say)


# ---------------------------------------------------------------------------- Prefect

def _limits(api: PrefectAPI) -> dict[str, int]:
    """Our live limits in Prefect now: {visit: limit}."""
    out, offset = {}, 0
    while True:
        page = api.request("POST", "/v2/concurrency_limits/filter", json={"offset": offset, "limit": 200})
        for item in page:
            if item["name"].startswith(LIMIT_PREFIX):
                out[item["name"][len(LIMIT_PREFIX):]] = int(item["limit"])
        if len(page) < 200:
            return out
        offset += len(page)


def provision_limits(api: PrefectAPI, wanted: Mapping[str, int], report: Report, say: Say = print, *,
                     prune: bool = True) -> None:
    """Make ``visitflow-live-<visit>`` exist with ``wanted[visit]`` slots; with ``prune``,
    delete the limits of visits not in ``wanted`` (a session that ended)."""
    have = _limits(api)
    for visit, limit in wanted.items():
        item = f"limit:{LIMIT_PREFIX}{visit}"
        if have.get(visit) == limit:
            report.add(item, "unchanged", say, str(limit))
            continue
        api.ensure_concurrency_limit(f"{LIMIT_PREFIX}{visit}", limit)
        report.add(item, "created" if visit not in have else "updated", say, str(limit))
    if prune:
        for visit in sorted(set(have) - set(wanted)):
            api.request("DELETE", f"/v2/concurrency_limits/{LIMIT_PREFIX}{visit}", ok404=True)
            report.add(f"limit:{LIMIT_PREFIX}{visit}", "removed", say)


# ---------------------------------------------------------------------------- OPA bundle

def _package_root(source: str, name: str) -> str:
    m = re.search(r"^package\s+([\w.]+)", source, re.M)
    if m is None:
        raise ConfigError(f"{name}: not a Rego module (no package line)")
    return m.group(1).replace(".", "/")


def policy_sources(policies: Iterable[Path]) -> dict[str, str]:
    """{file name: Rego source} of the given files and directories (a directory: its ``*.rego``
    but the ``*_test.rego`` unit tests, as deployed).  Checked: readable, a package line, no
    two files of one name (the bundle is flat)."""
    out: dict[str, str] = {}
    for given in map(Path, policies):
        files = sorted(f for f in given.glob("*.rego") if not f.name.endswith("_test.rego")) if given.is_dir() else [given]
        for f in files:
            try:
                src = f.read_text()
            except OSError as exc:
                raise ConfigError(f"{f}: cannot read the policy file: {exc.strerror}") from None
            _package_root(src, str(f))
            if f.name in out:
                raise ConfigError(f"{f}: a second policy file named {f.name} (the bundle is flat)")
            out[f.name] = src
    return out


def _bundle_bytes(document: dict, policies: Mapping[str, str] = {}) -> tuple[bytes, str]:
    """A deterministic bundle of ``document`` and ``policies`` ({file name: Rego source})
    — the same input gives the same bytes — and its revision."""
    data = json.dumps({"facility": {k: document["facility"][k] for k in ("subjects", "proposals", "beamlines",
                                                                         "sessions")}},
                      sort_keys=True, indent=1).encode()
    files = {"/data.json": data, **{f"/{name}": src.encode() for name, src in sorted(policies.items())}}
    revision = hashlib.sha256(b"\0".join(k.encode() + b"\0" + v for k, v in sorted(files.items()))).hexdigest()[:16]
    roots = sorted({*BUNDLE_ROOTS, *(_package_root(src, name) for name, src in policies.items())})
    files["/.manifest"] = json.dumps({"revision": revision, "roots": roots}, sort_keys=True).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue(), revision


def _bundle_files(path: Path) -> Optional[dict[str, bytes]]:
    """An existing bundle's files (None: there is none, or it is unreadable)."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            return {m.name.lstrip("/"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (OSError, tarfile.TarError):
        return None


def provision_bundle(path: Path, sessions: SessionList, report: Report, say: Say = print, *,
                     policies: Iterable[Path] = ()) -> str:
    """Write OPA's bundle at ``path`` (atomically: a poller never downloads half a file);
    returns its revision.  Each session and each policy file is an item.  ``policies``: Rego
    files to ship in the same bundle (as Kubernetes' OPA loads policy and data from one)."""
    path = Path(path)
    sources = policy_sources(policies)
    body, revision = _bundle_bytes(sessions.document, sources)
    old_files = _bundle_files(path) if path.exists() else None
    try:
        old = json.loads(old_files["data.json"])["facility"]["sessions"] if old_files else None
    except (KeyError, ValueError):
        old = None
    new = sessions.document["facility"]["sessions"]
    for visit in new:
        outcome = ("created" if old is None or visit not in old else
                   "unchanged" if old[visit] == new[visit] else "updated")
        report.add(f"opa:{visit}", outcome, say)
    for visit in sorted(set(old or {}) - set(new)):
        report.add(f"opa:{visit}", "removed", say)
    for name, src in sorted(sources.items()):
        before = (old_files or {}).get(name)
        report.add(f"opa-policy:{name}", "created" if before is None else
                   "unchanged" if before == src.encode() else "updated", say)
    for name in sorted(set(old_files or {}) - set(sources) - {"data.json", ".manifest"}):
        report.add(f"opa-policy:{name}", "removed", say)
    if not path.exists() or path.read_bytes() != body:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)
        say(f"opa: wrote {path} (revision {revision})")
    else:
        say(f"opa: {path} unchanged (revision {revision})")
    return revision


# ---------------------------------------------------------------------------- all three

def provision(sessions: SessionList, *, tiled: Optional[tuple[str, object]] = None,
              prefect: Optional[PrefectAPI] = None, bundle: Optional[Path] = None,
              policies: Iterable[Path] = (), layout: Optional[Layout] = None, say: Say = print) -> Report:
    """Tiled (``(uri, admin auth)``, its ``layout``), Prefect and the OPA bundle, each when given.  OPA's
    bundle is written last: a new session is only authorised once its containers and limit exist."""
    report = Report()
    visits = list(sessions.sessions)
    say(f"provisioning {len(visits)} session(s): {', '.join(visits) or '(none)'}")
    if tiled is not None:
        provision_tiled(tiled[0], tiled[1], sessions.sessions.values(), report, say, layout=layout)
    if prefect is not None:
        provision_limits(prefect, {v: s.live_limit for v, s in sessions.sessions.items()}, report, say)
    if bundle is not None:
        provision_bundle(bundle, sessions, report, say, policies=policies)
    say(report.summary())
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", required=True, help="the session list (deployments/opa/data.json's shape)")
    p.add_argument("--tiled-uri", default=os.environ.get("VISITFLOW_TILED_URI"),
                   help="Tiled to create the visit containers in (as visitflow-admin)")
    p.add_argument("--issuer", default=os.environ.get("VISITFLOW_ISSUER"),
                   help="where visitflow-admin gets its token (client_credentials)")
    p.add_argument("--admin-client-id", default="visitflow-admin")
    p.add_argument("--admin-secret-env", default="VISITFLOW_ADMIN_SECRET",
                   help="environment variable holding visitflow-admin's client secret")
    p.add_argument("--raw-template", default=None, help="Tiled's raw layout, as given to `visitflow tiled serve`")
    p.add_argument("--processed-template", default=None, help="Tiled's processed layout, likewise")
    p.add_argument("--prefect-api-url", default=os.environ.get("PREFECT_API_URL"))
    p.add_argument("--bundle", default=None, help="write OPA's bundle here (e.g. /srv/opa/visitflow.tar.gz)")
    p.add_argument("--policy", action="append", default=[], metavar="REGO",
                   help="a Rego file or directory to ship in the bundle too (repeatable; e.g. deployments/opa)")
    p.add_argument("--check", action="store_true", help="only validate the session list")


def run(args: argparse.Namespace) -> int:
    try:
        sessions = load_sessions(args.sessions)
        policy_sources(args.policy)    # checked before anything is touched, like the session list
    except ConfigError as exc:
        print(f"visitflow provision: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.sessions}: {len(sessions.sessions)} session(s), valid")
        return 0
    if not (args.tiled_uri or args.prefect_api_url or args.bundle):
        print("visitflow provision: nothing to do: give --tiled-uri, --prefect-api-url and/or --bundle (or --check)",
              file=sys.stderr)
        return 2
    tiled, layout = None, None
    if args.raw_template is not None or args.processed_template is not None:   # "": that store is elsewhere
        from ..core.layout import DEFAULT_PROCESSED_TEMPLATE, DEFAULT_RAW_TEMPLATE

        layout = Layout.from_templates(
            DEFAULT_RAW_TEMPLATE if args.raw_template is None else (args.raw_template or None),
            DEFAULT_PROCESSED_TEMPLATE if args.processed_template is None else (args.processed_template or None))
    if args.tiled_uri:
        secret = os.environ.get(args.admin_secret_env)
        if not args.issuer or not secret:
            print(f"visitflow provision: Tiled needs --issuer and ${args.admin_secret_env} (visitflow-admin's "
                  "client secret) for the admin token", file=sys.stderr)
            return 2
        from ..core.tiled_admin import admin_auth

        tiled = (args.tiled_uri, admin_auth(args.issuer, args.admin_client_id, secret))
    for part, flag, given in (("tiled", "--tiled-uri", args.tiled_uri),
                              ("prefect", "--prefect-api-url", args.prefect_api_url), ("opa", "--bundle", args.bundle)):
        if not given:
            print(f"{part}: skipped (no {flag})")
    api = PrefectAPI(args.prefect_api_url, os.environ.get("PREFECT_API_AUTH_STRING")) if args.prefect_api_url else None
    try:
        provision(sessions, tiled=tiled, prefect=api, bundle=Path(args.bundle) if args.bundle else None,
                  policies=[Path(p) for p in args.policy], layout=layout)
    finally:
        if api is not None:
            api.close()
    return 0
