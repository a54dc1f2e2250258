"""RunAccess.raw_path with ``{instrument}`` in the raw template: one Block for every beamline
(the flow run's ``instrument:`` tag fills it); a missing instrument is a clear ConfigError."""

from __future__ import annotations

import pytest

from visitflow.core.layout import Layout
from visitflow.errors import ConfigError
from visitflow.flow.credentials import RunAccess


def access(raw_template: str, instrument: str | None) -> RunAccess:
    layout = Layout.from_templates(raw_template, "processed/{visit}/{run}/{analysis}")
    return RunAccess("cm67890-1", "uid1", "peak_stats", None, None, None, None, layout, instrument=instrument)


def test_the_instrument_fills_the_raw_template():
    assert access("{instrument}/{proposal}/{visit}/{run}", "b21").raw_path == "b21/cm67890/cm67890-1/uid1"
    assert access("{instrument}/{proposal}/{visit}/{run}", "i22").raw_path == "i22/cm67890/cm67890-1/uid1"
    # a fixed beamline and the default layout ignore it
    assert access("i22/{proposal}/{visit}/{run}", "b21").raw_path == "i22/cm67890/cm67890-1/uid1"
    assert access("raw/{visit}/{run}", None).raw_path == "raw/cm67890-1/uid1"


def test_a_template_needing_an_instrument_the_run_lacks_says_so():
    with pytest.raises(ConfigError, match=r"needs 'instrument'.*visitflow trigger --instrument"):
        access("{instrument}/{proposal}/{visit}/{run}", None).raw_path
    with pytest.raises(Exception):
        access("{instrument}/{proposal}/{visit}/{run}", "../x").raw_path    # not a name
