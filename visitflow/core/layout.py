"""Node paths ↔ ``(store, visit, run)``: where a Tiled node sits in the visit/run hierarchy.

"Which scope governs this node" is the scope grammar (:mod:`visitflow.core.scopes`) asked
from the other side: path templates (``raw/{visit}/{run}``, blueapi's
``{instrument}/{proposal}/{visit}/{run}``) and the ``Layout`` that pairs a raw and a
processed template.  Everything that turns a node path into a visit and run, or back, calls
this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ..errors import ScopeError
from .scopes import CONCRETE_STORES, check_name

__all__ = [
    'DEFAULT_RAW_TEMPLATE', 'DEFAULT_PROCESSED_TEMPLATE', 'Location', 'implied_values', 'PathTemplate', 'Layout',
]

DEFAULT_RAW_TEMPLATE = "raw/{visit}/{run}"
DEFAULT_PROCESSED_TEMPLATE = "processed/{visit}/{run}/{analysis}"
_PLACEHOLDER = re.compile(r"^\{([a-z_]+)\}$")


@dataclass(frozen=True)
class Location:
    """Where a node sits in the visit/run hierarchy.

    ``depth`` says how far down the template the path reached: a store root or an
    ``<instrument>/<proposal>`` prefix has ``visit=None``; a visit container has
    ``run=None``; ``inside_run`` is True for the run container and everything below it.
    """

    store: str
    visit: str | None = None
    run: str | None = None
    analysis: str | None = None
    inside_run: bool = False


#: blueapi's instrument sessions (``cm12345-1``): proposal ``cm12345``, then the visit number.
_INSTRUMENT_SESSION_RE = re.compile(r"^(?P<proposal>[a-z]{2}\d+)-\d+$")


def implied_values(values: dict) -> dict:
    """Template values implied by others: ``{proposal}`` from an instrument-session
    ``{visit}`` (``cm12345-1`` → ``cm12345``, blueapi's own rule), so a flow that knows only
    (visit, run) finds a run in blueapi's ``{instrument}/{proposal}/{visit}/{run}`` layout."""
    if "proposal" in values or "visit" not in values:
        return values
    m = _INSTRUMENT_SESSION_RE.match(str(values["visit"]))
    return {**values, "proposal": m["proposal"]} if m else values


@dataclass(frozen=True)
class PathTemplate:
    """A node-path template such as ``raw/{visit}/{run}`` or
    ``{instrument}/{proposal}/{visit}/{run}`` (blueapi's layout).

    Literal segments must match exactly; ``{visit}``, ``{run}`` and ``{analysis}`` are
    captured; any other ``{name}`` matches any one segment.
    """

    store: str
    template: str

    def __post_init__(self):
        if self.store not in CONCRETE_STORES:
            raise ScopeError(f"template store must be one of {CONCRETE_STORES}, not {self.store!r}")
        segs = self.segments
        names = [_PLACEHOLDER.match(s)[1] for s in segs if _PLACEHOLDER.match(s)]
        if "visit" not in names or "run" not in names:
            raise ScopeError(f"path template {self.template!r} needs {{visit}} and {{run}}")
        if names.index("run") < names.index("visit"):
            raise ScopeError(f"path template {self.template!r}: {{visit}} must come before {{run}}")
        if self.store == "raw" and "analysis" in names:
            raise ScopeError("the raw template has no {analysis}")

    @property
    def segments(self) -> list[str]:
        return [s for s in self.template.strip("/").split("/") if s]

    def match(self, path: Iterable[str]) -> Location | None:
        """Map a node path (segments) to a Location, or None if it is not under this template."""
        path = list(path)
        captured: dict[str, str] = {}
        segs = self.segments
        for i, seg in enumerate(path[: len(segs)]):
            tmpl = segs[i]
            m = _PLACEHOLDER.match(tmpl)
            if m:
                captured[m[1]] = seg
            elif tmpl != seg:
                return None
        return Location(
            store=self.store,
            visit=captured.get("visit"),
            run=captured.get("run"),
            analysis=captured.get("analysis"),
            inside_run="run" in captured,
        )

    def format(self, **values: str) -> str:
        """The full path; every placeholder needs a value, and each value must be a valid name."""
        return self._render(values, partial=False)

    def prefix(self, **values: str) -> str:
        """Format as far as values are given (e.g. the visit container path)."""
        return self._render(values, partial=True)

    def _render(self, values: dict[str, str], *, partial: bool) -> str:
        """The one segment loop of :meth:`format` and :meth:`prefix`.

        ``partial`` stops at the first placeholder without a value (a prefix) and takes the
        values as given (its callers check the names they pass, e.g. ``ensure_visits``);
        otherwise a missing value is a ``KeyError`` and each value must pass :func:`check_name`.
        """
        values = implied_values(values)
        out = []
        for seg in self.segments:
            m = _PLACEHOLDER.match(seg)
            if not m:
                out.append(seg)
            elif m[1] in values:
                out.append(values[m[1]] if partial else check_name(values[m[1]], m[1]))
            elif partial:
                break
            else:
                raise KeyError(f"path template {self.template!r} needs {m[1]!r}")
        return "/".join(out)


@dataclass(frozen=True)
class Layout:
    """The raw and processed path templates of one deployment.

    With one Tiled server both templates apply to it (they must differ in a literal prefix);
    with two servers each server's policy gets a Layout holding only its store.
    """

    raw: PathTemplate | None = PathTemplate("raw", DEFAULT_RAW_TEMPLATE)
    processed: PathTemplate | None = PathTemplate("processed", DEFAULT_PROCESSED_TEMPLATE)

    @classmethod
    def from_templates(cls, raw: str | None = DEFAULT_RAW_TEMPLATE,
                       processed: str | None = DEFAULT_PROCESSED_TEMPLATE) -> "Layout":
        return cls(
            raw=PathTemplate("raw", raw) if raw else None,
            processed=PathTemplate("processed", processed) if processed else None,
        )

    def templates(self) -> list[PathTemplate]:
        return [t for t in (self.raw, self.processed) if t is not None]

    def locate(self, path: Iterable[str]) -> Location | None:
        """The Location of a node path, or None if no template claims it.

        The root (empty path) and shared literal prefixes return a Location with store set to
        the first matching template's store; callers treat ``visit=None`` as "above visits".
        """
        path = list(path)
        for t in self.templates():
            loc = t.match(path)
            if loc is not None:
                return loc
        return None
