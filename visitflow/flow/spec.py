"""What an analysis is: :class:`AnalysisSpec`, and the checks of an ``@analysis(...)`` declaration.

``@analysis(reads=[...])`` (:mod:`visitflow.flow.builder`) turns a plain function into a Prefect flow.

::

    @analysis(reads=["saxs"])
    def saxs_average(saxs: np.ndarray) -> dict[str, np.ndarray]:
        return {"average": np.average(saxs, axis=0)}

is a complete analysis.  The result is a Prefect flow named ``saxs-average`` taking
``visit`` and ``run_id``; deployed twice (``saxs-average/post`` and ``saxs-average/live``,
see prefect.yaml) it runs at rest or while the scan is running.  Post processing calls the
function once with every frame (the seed asks that this stay as simple as
``np.average(data[:], axis=0)``); live processing either recomputes on the data so far
(throttled), or — if the analyst gives an ``incremental=`` class — feeds it only new frames.

An incremental class is ``__init__()`` (empty state), ``update(**batch)`` (fold in new
frames, one keyword per ``reads`` field) and ``result() -> dict`` (the same outputs the
plain function returns).  The framework tests that both forms agree.

Everything about tokens, Tiled paths, polling, checkpoints and provenance lives elsewhere
(:mod:`visitflow.flow.engine`, :mod:`visitflow.flow.builder`); definitions are checked at import time
so a typo fails when the worker loads the flow, not halfway through a beamtime.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..errors import AnalysisDefinitionError
from ..core.names import flow_name
from ..core.outputs import check_outputs
from ..core.scopes import valid_name

__all__ = ['AnalysisSpec', 'declare']


@dataclass(frozen=True)
class AnalysisSpec:
    """Everything the framework needs to know about one analysis."""

    name: str
    reads: tuple[str, ...]
    function: Callable[..., dict]
    incremental: type | None = None
    stream: str = "primary"
    live_throttle: float = 2.0          # plain form: recompute at most this often while live
    description: str = ""
    extra: dict = field(default_factory=dict)
    options: type | None = None         # a visitflow.core.options.Options subclass, or None
    option_values: dict = field(default_factory=dict)  # resolved values this spec computes with

    @property
    def flow_name(self) -> str:
        return flow_name(self.name)

    def compute(self, data: dict[str, Any]) -> dict:
        """Run the plain function on all the data at once (post, and plain-form live)."""
        return check_outputs(self.name, self.function(**{k: data[k] for k in self.reads}, **self.option_values))

    def start_incremental(self):
        return self.incremental(**self.option_values) if self.incremental else None

    def with_options(self, values: dict | None) -> "AnalysisSpec":
        """This spec computing with ``values`` (validated, defaults filled in)."""
        from ..core.options import resolve

        return replace(self, option_values=resolve(self.options, values, self.name))

    def __call__(self, **fields_and_options) -> dict:
        """The science, directly: ``peak_stats.spec(det=..., motor=..., background=10.0)``.
        Options are validated and defaulted as in a flow run; no Prefect, no Tiled."""
        data = {k: fields_and_options.pop(k) for k in self.reads if k in fields_and_options}
        missing = [k for k in self.reads if k not in data]
        if missing:
            raise TypeError(f"{self.name}() needs the fields {missing} (reads={list(self.reads)})")
        return self.with_options(fields_and_options).compute(data)


def _params(fn: Callable) -> list[inspect.Parameter]:
    return list(inspect.signature(fn).parameters.values())


def _check_accepts_reads(owner: str, fn: Callable, reads: tuple[str, ...], what: str = "the fields in reads=") -> None:
    params = [p for p in _params(fn) if p.name != "self"]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)]
    missing = [r for r in reads if r not in names]
    extra = [p.name for p in params if p.name not in reads and p.default is inspect.Parameter.empty
             and p.kind not in (inspect.Parameter.VAR_POSITIONAL,)]
    if missing or extra:
        raise AnalysisDefinitionError(
            f"{owner} must take exactly {what}{list(reads)} as keyword arguments; "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected required {extra}" if extra else "")
        )


def declare(reads: list[str] | tuple[str, ...], *, incremental: type | None = None,
            options: type | None = None, name: str | None = None, stream: str = "primary",
            live_throttle: float = 2.0):
    """Check an ``@analysis(...)`` declaration and return ``fn -> AnalysisSpec``.

    The arguments are :func:`visitflow.analysis`'s (documented there); what is wrong with
    ``reads`` or ``live_throttle`` is refused here, before the function is seen, and what is
    wrong with the function or its incremental class when it is given.  No Prefect: the flow
    is built from the spec by :mod:`visitflow.flow.builder`.
    """
    if isinstance(reads, str) or not reads:
        raise AnalysisDefinitionError("reads= must be a non-empty list of field names, e.g. reads=['saxs']")
    reads = tuple(reads)
    for r in reads:
        if not valid_name(r):
            raise AnalysisDefinitionError(f"reads= field {r!r} is not a valid field name")
    if len(set(reads)) != len(reads):
        raise AnalysisDefinitionError(f"reads= lists a field twice: {list(reads)}")
    if live_throttle < 0:
        raise AnalysisDefinitionError("live_throttle must be >= 0 seconds")

    def decorate(fn: Callable):
        if not callable(fn):
            raise AnalysisDefinitionError("@analysis(...) decorates a function")
        analysis_name = name or fn.__name__
        if not valid_name(analysis_name):
            raise AnalysisDefinitionError(f"analysis name {analysis_name!r} is not valid")
        option_names: tuple[str, ...] = ()
        if options is not None:
            from ..core.options import check_model

            check_model(options, f"analysis {analysis_name}")
            option_names = tuple(options.model_fields)
        if set(option_names) & set(reads):
            raise AnalysisDefinitionError(f"analysis {analysis_name}: an option has the name of a reads= field")
        _check_accepts_reads(f"analysis function {analysis_name}", fn, reads + option_names,
                             "the fields in reads= and the options ")
        if incremental is not None:
            if not inspect.isclass(incremental):
                raise AnalysisDefinitionError("incremental= takes a class with update(**batch) and result()")
            for method in ("update", "result"):
                if not callable(getattr(incremental, method, None)):
                    raise AnalysisDefinitionError(f"incremental class {incremental.__name__} has no {method}()")
            _check_accepts_reads(f"{incremental.__name__}.update", incremental.update, reads)
            if option_names:
                _check_accepts_reads(f"{incremental.__name__}.__init__", incremental.__init__, option_names,
                                     "the options ")
            else:
                required = [p for p in _params(incremental.__init__)[1:]
                            if p.default is inspect.Parameter.empty
                            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
                if required:
                    raise AnalysisDefinitionError(f"incremental class {incremental.__name__}() must take no arguments")
        spec = AnalysisSpec(
            name=analysis_name, reads=reads, function=fn, incremental=incremental, stream=stream,
            live_throttle=live_throttle, description=inspect.getdoc(fn) or "", options=options,
        )
        if options is not None:
            spec = spec.with_options({})  # defaults: what a run without plan options computes
        return spec

    return decorate
