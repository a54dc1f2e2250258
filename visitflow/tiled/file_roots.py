"""Where a visit's detector files may live, and the check that registrations stay there.

Real detectors (area detectors through ophyd-async, at DLS and NSLS-II alike) write HDF5
or TIFF files themselves; the RunEngine emits ``StreamResource``/``StreamDatum`` documents
and ``TiledWriter`` *registers* those files with Tiled (``POST /register``, then ``PUT
/data_source`` as frames arrive).  Tiled's own guard, ``readable_storage``, is server-wide:
any principal allowed to register could point a node of *their* run at a file of *another*
visit on the same disk and read it through Tiled.  So the ``register`` scope is granted
only together with this check: every ``file://`` asset registered under a node of visit V
must resolve (lexically, ``..`` collapsed) to a path under V's data directory.

Roots are path templates per store, e.g. ``{"raw": "/dls/i22/data/{year}/{visit}"}``:
``{visit}`` is the node's visit; a placeholder the node path also captures (e.g.
``{instrument}`` in blueapi's layout) takes that value; any other placeholder (``{year}``)
matches exactly one directory name.  Only ``file`` URIs are accepted: other schemes are
not path-scoped.

Not covered (say so in a deployment review): symlinks inside a visit directory that point
outside it — Tiled opens what the link points to.  Keep detector directories free of
user-made links, or mount them ``nosymfollow``.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional
from urllib.parse import unquote, urlparse

from ..errors import FileRootError
from ..core.layout import Layout
from ..core.scopes import check_name

__all__ = [ 'FileRoot', 'file_path', 'FileRoots', 'asset_uris']

_PLACEHOLDER = re.compile(r"^\{([a-z_]+)\}$")


@dataclass(frozen=True)
class FileRoot:
    store: str
    template: str

    def __post_init__(self):
        if not self.template.startswith("/"):
            raise FileRootError(f"file root for {self.store!r} must be an absolute path template: {self.template!r}")
        if "{visit}" not in self.segments:
            raise FileRootError(f"file root {self.template!r} needs a {{visit}} segment of its own")
        if any(s in (".", "..") for s in self.segments):
            raise FileRootError(f"file root {self.template!r} may not contain . or ..")

    @property
    def segments(self) -> list[str]:
        return [s for s in self.template.split("/") if s]

    @property
    def static_prefix(self) -> str:
        """The directory above the first placeholder: what Tiled must be allowed to read."""
        out = []
        for seg in self.segments:
            if _PLACEHOLDER.match(seg):
                break
            out.append(seg)
        return "/" + "/".join(out)

    def pattern(self, captured: Mapping[str, str]) -> re.Pattern:
        parts = []
        for seg in self.segments:
            m = _PLACEHOLDER.match(seg)
            if m and m[1] in captured:
                parts.append(re.escape(check_name(captured[m[1]], m[1])))
            elif m:
                parts.append(r"[^/]+")
            else:
                parts.append(re.escape(seg))
        return re.compile("^/" + "/".join(parts) + "/.+$")

    def describe(self, captured: Mapping[str, str]) -> str:
        return "/" + "/".join(
            captured.get(m[1], seg) if (m := _PLACEHOLDER.match(seg)) else seg for seg in self.segments)


def file_path(data_uri: str) -> Optional[str]:
    """The normalised local path of a ``file://`` URI (``None`` for any other scheme)."""
    parsed = urlparse(data_uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return None
    path = unquote(parsed.path)
    if not path.startswith("/") or "\x00" in path:
        return None
    return posixpath.normpath(path)


class FileRoots:
    """The per-store data directories of one deployment (see the module docstring)."""

    def __init__(self, roots: Mapping[str, str] | None, layout: Layout):
        self.roots = {store: FileRoot(store, t) for store, t in (roots or {}).items() if t}
        self.layout = layout
        unknown = set(self.roots) - {t.store for t in layout.templates()}
        if unknown:
            raise FileRootError(f"file roots for stores this server does not hold: {sorted(unknown)}")

    def __bool__(self) -> bool:
        return bool(self.roots)

    @property
    def stores(self) -> set[str]:
        return set(self.roots)

    def readable_storage(self) -> list[str]:
        return sorted({r.static_prefix for r in self.roots.values()})

    def refusal(self, node_path: Iterable[str], data_uris: Iterable[str]) -> Optional[str]:
        """Why registering ``data_uris`` at ``node_path`` is refused, or ``None`` if it is fine."""
        node_path = [s for s in node_path if s]
        data_uris = list(data_uris)
        if not data_uris:
            return None
        for template in self.layout.templates():
            loc = template.match(node_path)
            if loc is None:
                continue
            root = self.roots.get(loc.store)
            if root is None:
                return f"this server registers no external files in the {loc.store} store"
            if loc.visit is None or not loc.inside_run:
                return "external files may be registered only inside a run"
            captured = _captured(template.segments, node_path)
            pattern = root.pattern(captured)
            for uri in data_uris:
                path = file_path(uri)
                if path is None:
                    return f"only file:// data URIs on this host may be registered, not {uri!r}"
                if not pattern.match(path):
                    return (f"{uri} is outside the data directory of visit {loc.visit} "
                            f"({root.describe(captured)})")
            return None
        return "external files may be registered only inside a run"


def _captured(template_segments: list[str], node_path: list[str]) -> dict[str, str]:
    out = {}
    for tmpl, seg in zip(template_segments, node_path):
        m = _PLACEHOLDER.match(tmpl)
        if m:
            out[m[1]] = seg
    return out


def asset_uris(body: object) -> list[str]:
    """Every ``assets[].data_uri`` of a ``POST /register`` or ``PUT /data_source`` body."""
    if not isinstance(body, dict):
        return []
    sources = []
    if isinstance(body.get("data_source"), dict):
        sources.append(body["data_source"])
    if isinstance(body.get("data_sources"), list):
        sources += [s for s in body["data_sources"] if isinstance(s, dict)]
    out = []
    for source in sources:
        assets = source.get("assets") or []
        if not isinstance(assets, list):
            return ["<malformed assets>"]  # never matches a root: refused, not skipped
        for asset in assets:
            out.append(str(asset.get("data_uri", "")) if isinstance(asset, dict) else "<malformed asset>")
    return out
