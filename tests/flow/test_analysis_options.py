"""Typed analysis options: declared on @analysis, set per plan, refused with the reason
before any flow run, passed as flow parameters, shown in the deployment schema (the UI's
form), recorded in provenance, the same for live and post, part of the idempotency key."""

import json

import numpy as np
import pytest
from pydantic import Field, SecretStr

from visitflow.core import names as grants
from visitflow.core.options import Options, canonical, digest, schema_problem
from visitflow.errors import AnalysisDefinitionError, OptionError
from visitflow.flow.builder import analysis
from visitflow.trigger import AnalysisTrigger
from visitflow.trigger.plans import uses_analyses

from tests.fixtures.scans import run_scan, user_root
from tests.flow.test_numerics import peak_stats
from tests.trigger.test_trigger import settings_for

pytestmark = pytest.mark.analysts


# ------------------------------------------------------------------ declaring options
class Roi(Options):
    threshold: float = Field(1.0, ge=0, description="Ignore pixels below this.")
    roi: tuple[int, int, int, int] = Field((0, 0, 4, 4), description="y0, x0, y1, x1.")


class RoiSum:
    def __init__(self, threshold, roi):
        self.threshold, self.roi, self.total = threshold, roi, 0.0

    def update(self, img):
        y0, x0, y1, x1 = self.roi
        part = np.asarray(img, dtype=np.float64)[:, y0:y1, x0:x1]
        self.total += float(np.where(part >= self.threshold, part, 0).sum())

    def result(self):
        return {"total": self.total}


@analysis(reads=["img"], options=Roi, incremental=RoiSum)
def roi_sum(img, threshold, roi):
    """Sum of pixels at or above threshold inside roi."""
    y0, x0, y1, x1 = roi
    part = np.asarray(img, dtype=np.float64)[:, y0:y1, x0:x1]
    return {"total": float(np.where(part >= threshold, part, 0).sum())}


def test_options_reach_the_function_and_the_incremental_form():
    from visitflow.flow.testing import assert_check

    img = np.arange(2 * 6 * 6, dtype=float).reshape(2, 6, 6)
    assert roi_sum.spec(img=img)["total"] == img[:, :4, :4].sum()          # defaults
    assert roi_sum.spec(img=img, roi=[1, 1, 3, 3], threshold=40)["total"] == sum(
        v for v in img[:, 1:3, 1:3].ravel() if v >= 40)
    assert_check(roi_sum, {"img": np.random.default_rng(0).random((30, 6, 6)) * 3},
                 options={"threshold": 1.5, "roi": [0, 1, 5, 6]})
    with pytest.raises(OptionError, match="threshold=-1.*greater than or equal to 0"):
        roi_sum.spec(img=img, threshold=-1)
    with pytest.raises(OptionError, match="roi.*Extra inputs|roy"):
        roi_sum.spec(img=img, roy=[0, 0, 1, 1])


def test_the_flow_has_one_typed_parameter_per_option():
    from prefect.utilities.callables import parameter_schema

    props = parameter_schema(roi_sum).model_dump()["properties"]
    assert set(props) == {"visit", "run_id", "variant", "threshold", "roi"}
    assert props["threshold"]["minimum"] == 0 and props["threshold"]["description"] == "Ignore pixels below this."
    assert props["roi"]["default"] == [0, 0, 4, 4] and props["roi"]["minItems"] == 4
    assert roi_sum.function.__name__ == "roi_sum" and roi_sum.function(img=np.ones((1, 4, 4)), threshold=0,
                                                                        roi=(0, 0, 2, 2)) == {"total": 4.0}


def _define(options_cls, fn=None, incremental=None):
    return analysis(reads=["img"], options=options_cls, incremental=incremental, name="t")(
        fn or (lambda img, **kw: {"x": 1}))


@pytest.mark.parametrize("body,match", [
    ({"api_token": (str, Field("x", description="."))}, "looks like a secret"),
    ({"login": (SecretStr, Field(SecretStr("x"), description="."))}, "looks like a secret"),
    ({"visit": (str, Field("a", description="."))}, "reserved"),
    ({"level": (float, Field(..., description="."))}, "needs a default"),
])
def test_bad_option_declarations_fail_at_definition(body, match):
    from pydantic import create_model

    model = create_model("Bad", __base__=Options, **body)
    with pytest.raises(AnalysisDefinitionError, match=match):
        _define(model)


def test_function_and_incremental_must_take_the_options():
    from pydantic import BaseModel

    with pytest.raises(AnalysisDefinitionError, match="reads= and the options"):
        _define(Roi, fn=lambda img, threshold: {"x": 1})
    with pytest.raises(AnalysisDefinitionError, match="RoiSumNoRoi.__init__ must take exactly the options"):
        _define(Roi, incremental=type("RoiSumNoRoi", (RoiSum,), {"__init__": lambda self, threshold: None}))
    with pytest.raises(AnalysisDefinitionError, match="must forbid unknown"):
        _define(type("Loose", (BaseModel,), {"__annotations__": {"a": int}, "a": 1}))


# ------------------------------------------------------------------ plans and keys
def test_plans_carry_options_in_the_start_document():
    import bluesky.plans as bp
    from bluesky import RunEngine
    from ophyd.sim import det, motor

    @uses_analyses("peak_stats", "saxs_average", options={"peak_stats": {"background": 1e5}})
    def plan():
        return (yield from bp.scan([det], motor, 0, 1, 2))

    docs = []
    RunEngine({}, context_managers=[])(plan(), lambda n, d: docs.append((n, d)))
    start = docs[0][1]
    assert start["analyses"] == ["peak_stats", "saxs_average"]
    assert start["analysis_options"] == {"peak_stats": {"background": 1e5}}
    with pytest.raises(ValueError, match="does not use"):
        uses_analyses("saxs_average", options={"peak_stats": {"background": 1}})
    with pytest.raises(OptionError, match="looks like a secret"):
        uses_analyses("peak_stats", options={"peak_stats": {"password": "x"}})
    with pytest.raises(OptionError, match="not a JSON value"):
        uses_analyses("peak_stats", options={"peak_stats": {"background": object()}})


def test_options_are_part_of_the_idempotency_key():
    base = grants.idempotency_key("peak_stats", "post", "a1", "u1")
    assert base == "peak_stats/post/a1/u1" == grants.idempotency_key("peak_stats", "post", "a1", "u1", {})
    one = grants.idempotency_key("peak_stats", "post", "a1", "u1", {"background": 1.0})
    other = grants.idempotency_key("peak_stats", "post", "a1", "u1", {"background": 2.0})
    assert len({base, one, other}) == 3 and one.endswith("/opt-" + digest({"background": 1.0}))
    assert canonical({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_schema_problems_name_the_option_and_the_reason():
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(roi_sum).model_dump()
    assert schema_problem(schema, {"threshold": 2.0, "roi": [0, 0, 1, 1]}, "roi_sum") is None
    assert "threshold=-3: -3 is less than the minimum of 0" in schema_problem(schema, {"threshold": -3}, "roi_sum")
    assert "has no option thresold (it has: roi, threshold)" in schema_problem(schema, {"thresold": 1}, "roi_sum")
    assert "too short" in schema_problem(schema, {"roi": [1, 2]}, "roi_sum")
    assert "takes no options" in schema_problem({"properties": {"visit": {}, "run_id": {}}}, {"x": 1}, "plain")


def test_the_trigger_queues_one_key_per_option_set(tmp_path):
    trig = AnalysisTrigger(settings_for(tmp_path), token="t", start_sender=False)
    trig("start", {"uid": "u1", "visit": "a1", "analyses": ["peak_stats", "saxs_average"],
                   "analysis_options": {"peak_stats": {"background": 3.0}}})
    trig("start", {"uid": "u2", "visit": "a1", "analyses": ["peak_stats"],
                   "analysis_options": {"peak_stats": {"token": "x"}}})      # refused, nothing queued
    trig("stop", {"run_start": "u1", "exit_status": "success"})
    keys = {r.key for r in trig.outbox.requests()}
    tag = "/opt-" + digest({"background": 3.0})
    assert keys == {"peak_stats/live/a1/u1" + tag, "peak_stats/post/a1/u1" + tag,
                    "saxs_average/live/a1/u1", "saxs_average/post/a1/u1"}
    assert trig.outbox.grant("peak_stats", "a1", "u1").option_values == {"background": 3.0}
    assert any(d.startswith("REFUSED peak_stats for run u2") and "secret" in d for d in trig.decisions)
    trig.close()


# ------------------------------------------------------------------ real stack
def plan_with(options):
    def make(det, saxs, motor, md):
        import bluesky.plans as bp

        @uses_analyses("peak_stats", options={"peak_stats": options})
        def scan():
            return (yield from bp.scan([det, saxs], motor, -2, 2, 9, md=md))

        return scan()

    return make


@pytest.mark.e2e
@pytest.mark.parametrize("options,reason", [
    ({"background": -5.0}, "option background=-5.0: -5.0 is less than the minimum of 0"),
    ({"backgroud": 5.0}, "has no option backgroud (it has: background)"),
    ({"background": "lots"}, "option background='lots': 'lots' is not of type 'number'"),
])
def test_a_bad_option_is_refused_with_the_reason_and_no_flow_run(tmp_path, idp, tiled_server, prefect_stack,
                                                                 options, reason):
    token = idp.token("alice")
    trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer, prefect_stack.api_url), token=token)
    uid = run_scan(tiled_server.uri, token, plan=plan_with(options), subscribers=[trig])
    assert trig.flush(60)
    states = {r.state for r in trig.outbox.requests()}
    trig.close()
    refused = [d for d in trig.decisions if d.startswith("REFUSED peak_stats")]
    assert len(refused) == 1 and reason in refused[0] and "no flow run" in refused[0], trig.decisions
    assert not any(d.startswith("delegated") for d in trig.decisions), "the bad option reached the IdP"
    assert states == {"refused"}
    assert prefect_stack.api.flow_runs(tags=[f"run:{uid}"]) == []


@pytest.mark.e2e
def test_plan_options_run_live_and_post_alike_and_are_recorded(tmp_path, idp, tiled_server, prefect_stack):
    options = {"background": 2.5}
    token = idp.token("alice")
    trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer, prefect_stack.api_url), token=token)
    uid = run_scan(tiled_server.uri, token, plan=plan_with(options), subscribers=[trig])
    assert trig.flush(60), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
    trig.close()
    runs = {r["name"].split()[0]: r for r in prefect_stack.api.flow_runs(tags=[f"run:{uid}"])}
    assert set(runs) == {"peak-stats/live", "peak-stats/post"}
    for variant, r in (("live", runs["peak-stats/live"]), ("post", runs["peak-stats/post"])):
        assert r["parameters"] == {"visit": "a1", "run_id": uid, **options}
        assert r["idempotency_key"] == grants.idempotency_key("peak_stats", variant, "a1", uid, options)
        done = prefect_stack.api.wait_for_flow_run(r["id"], timeout=240)
        assert done["state"]["type"] == "COMPLETED", prefect_stack.logs(r["id"])
    # The UI's run form and parameter view come from the deployment's schema.
    schema = prefect_stack.api.deployment_parameter_schema("peak-stats/post")
    assert schema["properties"]["background"]["description"].startswith("Counts subtracted")
    root = user_root(tiled_server.uri, idp.token("alice"))
    node = root[f"processed/a1/{uid}/peak_stats"]
    raw = root[f"raw/a1/{uid}/primary"]
    want = peak_stats.spec(det=raw["det"].read(), motor=raw["motor"].read(), **options)
    assert want != peak_stats.spec(det=raw["det"].read(), motor=raw["motor"].read())
    for key in ("live", node.metadata["current"]):
        meta = node[key].metadata
        assert meta["options"] == options, key
        for out in ("centroid", "integral", "peak_value"):
            assert meta["scalars"][out] == pytest.approx(want[out], rel=1e-9), (key, out)
    assert json.loads(json.dumps(node.metadata["options"])) == options
