"""``uses_analyses``: a plan declares which analyses its runs need.

The names go into the start document's ``analyses`` metadata, where the trigger reads them
— so a plan carries its own analysis wiring and nothing in blueapi's config must change
when a plan gains one.
"""

from __future__ import annotations

import functools

from bluesky import preprocessors as bpp

from ..core.options import check_plan_values
from ..core.scopes import check_name

__all__ = ['uses_analyses']


def uses_analyses(*names: str, options: dict[str, dict] | None = None):
    """Decorate a plan function: its runs start ``names`` (e.g. ``"saxs_average"``).

    ``options`` sets typed analysis options per analysis, e.g.
    ``options={"peak_stats": {"background": 1e5}}``: they go into the start document's
    ``analysis_options``; the trigger checks them against the analysis' declared options
    before any flow run (:mod:`visitflow.core.options`) and refuses, with the reason, if they do
    not fit.  Options are public (Prefect UI, provenance): never put a secret here.
    """
    for name in names:
        check_name(name, "analysis name")
    if not names:
        raise ValueError("uses_analyses() needs at least one analysis name")
    options = dict(options or {})
    for name, values in options.items():
        if name not in names:
            raise ValueError(f"uses_analyses(): options for {name!r}, which the plan does not use {list(names)}")
        check_plan_values(name, values)
    md = {"analyses": list(names), **({"analysis_options": options} if options else {})}

    def decorate(plan_function):
        @functools.wraps(plan_function)
        def wrapper(*args, **kwargs):
            return (yield from bpp.inject_md_wrapper(plan_function(*args, **kwargs), md))

        wrapper.analyses = tuple(names)
        wrapper.analysis_options = options
        return wrapper

    return decorate
