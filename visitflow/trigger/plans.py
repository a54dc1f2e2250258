"""``uses_analyses``: a plan declares which analyses its runs need.

The names go into the start document's ``analyses`` metadata, where the trigger reads them
— so a plan carries its own analysis wiring and nothing in blueapi's config must change
when a plan gains one.
"""

from __future__ import annotations

import functools

from bluesky import preprocessors as bpp

from ..scopes import check_name


def uses_analyses(*names: str):
    """Decorate a plan function: its runs start ``names`` (e.g. ``"saxs_average"``)."""
    for name in names:
        check_name(name, "analysis name")
    if not names:
        raise ValueError("uses_analyses() needs at least one analysis name")

    def decorate(plan_function):
        @functools.wraps(plan_function)
        def wrapper(*args, **kwargs):
            return (yield from bpp.inject_md_wrapper(plan_function(*args, **kwargs),
                                                     {"analyses": list(names)}))

        wrapper.analyses = tuple(names)
        return wrapper

    return decorate
