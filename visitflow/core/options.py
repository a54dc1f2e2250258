"""Typed analysis options: declared on ``@analysis``, set per plan, checked before any flow run.

An analyst declares what may be tuned without new code (a background level, a region of
interest, a threshold) as a pydantic model::

    class PeakOptions(Options):
        background: float = Field(0.0, ge=0, description="Counts subtracted from every point.")

    @analysis(reads=["det", "motor"], options=PeakOptions)
    def peak_stats(det, motor, background): ...

A plan sets values with ``uses_analyses("peak_stats", options={"peak_stats": {"background": 1e5}})``.
The values travel in the start document, are checked by the trigger against the deployment's
parameter schema (which Prefect generated from the model) *before* the grant exchange, become
flow parameters beside ``visit`` and ``run_id`` (so the Prefect UI shows them), are recorded in
the result's provenance, and are part of the idempotency key — the same values for the live
and the post run of one scan.

Options are never secrets: everyone who can see the flow run or the result can read them, so
secret types are refused when the analysis is defined.  One owner: this module holds the
rules; :mod:`visitflow.flow.spec` calls them at definition, the trigger before it creates runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, SecretBytes, SecretStr, ValidationError

from ..errors import AnalysisDefinitionError, OptionError
from .scopes import valid_name

__all__ = ["Options", "describe", "RESERVED", "check_model", "resolve", "flow_parameters", "docstring_args",
           "check_plan_values", "canonical", "digest", "schema_problem"]

#: Flow parameters the framework owns; an option may not shadow them.
RESERVED = frozenset({"visit", "run_id", "variant"})
#: Names that suggest a secret: options are public, so these are refused outright.
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "apikey", "api_key")
_SCALARS = (str, int, float, bool, type(None))


class Options(BaseModel):
    """Base class for an analysis' options: unknown names are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _secret_types(annotation) -> bool:
    if annotation in (SecretStr, SecretBytes):
        return True
    return any(_secret_types(a) for a in typing.get_args(annotation))


def check_model(model: Any, owner: str) -> None:
    """Definition-time rules for ``options=``: an :class:`Options` subclass, JSON-able,
    no secret types or names, no name the framework already uses."""
    if not (inspect.isclass(model) and issubclass(model, BaseModel)):
        raise AnalysisDefinitionError(f"{owner}: options= takes a visitflow.core.options.Options subclass")
    if model.model_config.get("extra") != "forbid":
        raise AnalysisDefinitionError(f"{owner}: options model {model.__name__} must forbid unknown names "
                                      "(subclass visitflow.core.options.Options)")
    for name, field in model.model_fields.items():
        if name in RESERVED or not valid_name(name) or not name.isidentifier():
            raise AnalysisDefinitionError(f"{owner}: option name {name!r} is reserved or not a Python identifier")
        if any(word in name.lower() for word in _SECRET_WORDS) or _secret_types(field.annotation):
            raise AnalysisDefinitionError(
                f"{owner}: option {name!r} looks like a secret; options are shown in the Prefect UI and "
                "recorded in provenance — secrets belong in a Prefect Secret block")
        if field.is_required():
            raise AnalysisDefinitionError(f"{owner}: option {name!r} needs a default (plans may leave it unset)")
    try:
        model().model_dump(mode="json")
    except Exception as exc:  # noqa: BLE001 - any failure here is a definition error
        raise AnalysisDefinitionError(f"{owner}: option defaults are not JSON values: {exc}") from exc


def resolve(model: type[BaseModel] | None, values: dict | None, analysis: str = "") -> dict:
    """Validate ``values`` against ``model`` and fill in defaults; JSON-able result."""
    values = dict(values or {})
    if model is None:
        if values:
            raise OptionError(f"analysis {analysis or '?'} takes no options, got {sorted(values)}")
        return {}
    try:
        return model.model_validate(values).model_dump(mode="json")
    except ValidationError as exc:
        raise OptionError(f"analysis {analysis or model.__name__}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    return "; ".join(f"option {'.'.join(map(str, e['loc'])) or '?'}={e.get('input')!r}: {e['msg']}"
                     for e in exc.errors())


def flow_parameters(model: type[BaseModel] | None) -> list[inspect.Parameter]:
    """The options as keyword parameters of the flow, with their types, constraints and
    descriptions (``Annotated[..., FieldInfo]``): Prefect turns them into the deployment's
    parameter schema, which the UI renders as a form and the trigger validates against."""
    if model is None:
        return []
    # Constraints travel in the annotation's metadata; descriptions in docstring_args().
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.get_default(),
                              annotation=Annotated[(field.annotation, *field.metadata)] if field.metadata
                              else field.annotation)
            for name, field in model.model_fields.items()]


def docstring_args(model: type[BaseModel] | None) -> str:
    """A Google-style ``Args:`` section describing the options: Prefect reads parameter
    descriptions for the schema (and so the UI form) from the flow function's docstring."""
    if model is None:
        return ""
    lines = [f"    {name}: {' '.join((field.description or name).split())}"
             for name, field in model.model_fields.items()]
    return "\n\nArgs:\n" + "\n".join(lines)


def check_plan_values(analysis: str, values: Any) -> dict:
    """What a plan may say before any schema is known: a dict of JSON values, not secrets."""
    if not isinstance(values, dict):
        raise OptionError(f"options for {analysis} must be a dict of name -> value, not {type(values).__name__}")
    for name, value in values.items():
        if not isinstance(name, str) or name in RESERVED or not name.isidentifier():
            raise OptionError(f"options for {analysis}: {name!r} is not a valid option name")
        if any(word in name.lower() for word in _SECRET_WORDS):
            raise OptionError(f"options for {analysis}: {name!r} looks like a secret; options are public")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"options for {analysis}: {name}={value!r} is not a JSON value ({exc})") from None
    return dict(values)


def canonical(values: dict | None) -> str:
    """One spelling of a set of values (sorted keys, no spaces): what keys and hashes use."""
    return json.dumps(values or {}, sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest(values: dict | None) -> str:
    """Short stable hash of option values ('' for none), for idempotency keys."""
    if not values:
        return ""
    return hashlib.sha256(canonical(values).encode()).hexdigest()[:12]


def schema_problem(schema: dict | None, values: dict, analysis: str) -> str | None:
    """Check plan option values against a deployment's ``parameter_openapi_schema`` (what
    Prefect generated from the options model).  Returns the reason they are refused, or
    None.  Used by the trigger, which has the schema but not the analysis code."""
    if not values:
        return None
    properties = dict((schema or {}).get("properties") or {})
    known = set(properties) - RESERVED
    unknown = sorted(set(values) - known)
    if unknown:
        return (f"analysis {analysis} has no option {', '.join(unknown)}"
                + (f" (it has: {', '.join(sorted(known))})" if known else " (it takes no options)"))
    import jsonschema

    sub = {**(schema or {}), "properties": {k: properties[k] for k in values}, "required": []}
    errors = sorted(jsonschema.Draft202012Validator(sub).iter_errors(values), key=lambda e: list(e.path))
    if errors:
        return "; ".join(f"option {'.'.join(map(str, e.path)) or '?'}={e.instance!r}: {e.message}" for e in errors)
    return None
