"""An analysis that reads a field the run does not have: the deployed flow run fails with
:class:`visitflow.errors.MissingField` and a message that names the field and what the run
has -- on the real path (a real scan in Tiled, the deployed ``saxs_average/post`` on the real
worker), and the failure is recorded where the analyst looks in Tiled.

Why: a scan without the 2-D detector is an ordinary operator mistake; the analyst must learn
from the run's state which field was missing, not from a traceback deep in a zarr read.
"""

from __future__ import annotations

import pytest

from tests.fixtures.scans import run_scan, user_root
from visitflow.stack.sim import motor_scan

pytestmark = pytest.mark.e2e

GRANT = "run:{a}:{v} read:raw:{v}/{r} write:processed:{v}/{r}"


def scalar_only_scan(det, saxs, motor, md):
    """A scan of the motor and the scalar detector only: no ``saxs`` field in the run."""
    return motor_scan([det], motor, 4, md=md)


def test_an_analysis_reading_a_field_the_run_lacks_fails_with_missing_field(idp, tiled_server, prefect_stack):
    alice = idp.token("alice")
    uid = run_scan(tiled_server.uri, alice, plan=scalar_only_scan)
    raw = user_root(tiled_server.uri, alice)[f"raw/a1/{uid}/primary"]
    assert "saxs" not in raw and "det" in raw, sorted(raw)   # the premise: the run really lacks it
    grant = idp.exchange(alice, "blueapi", audience="visitflow",
                         scope=GRANT.format(a="saxs_average", v="a1", r=uid))["access_token"]
    prefect_stack.store_grant("saxs_average", "a1", uid, grant)

    run = prefect_stack.run("saxs_average", "post", "a1", uid)
    kind, message = run["state"]["type"], run["state"].get("message") or ""
    wanted = "raw run stream 'primary' has no field(s) ['saxs']; it has ["
    logs = "" if wanted in message else prefect_stack.logs(run["id"], wait_for=wanted)
    assert kind == "FAILED", (kind, message)
    assert wanted in message or wanted in logs, (message, logs[-3000:])
    told = message if wanted in message else logs
    assert "MissingField" in told, told[-3000:]
    has = told.split(wanted, 1)[1].split("]", 1)[0]
    assert "'det'" in has, has            # it says what the run does have

    # the analyst sees the same in Tiled, on the post node the run opened
    analysis = user_root(tiled_server.uri, idp.token("alice"))[f"processed/a1/{uid}/saxs_average"]
    (post,) = [analysis[key] for key in analysis if key.startswith("post-")]
    assert post.metadata["status"] == "failed", dict(post.metadata)
    assert post.metadata["error"].startswith("MissingField: " + wanted), post.metadata["error"]
    assert not analysis.metadata.get("current"), "a failed run points readers at no result"
