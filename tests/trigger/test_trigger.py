"""The blueapi-side trigger: decisions from documents (pure), and end to end with a real
RunEngine, TiledWriter, IdP, Tiled and Prefect server + worker."""

import json

import numpy as np

import pytest

from visitflow.trigger import AnalysisTrigger, TriggerSettings
from visitflow.trigger.outbox import Outbox

from tests.fixtures.waiting import wait_until
from tests.fixtures.scans import run_scan, user_root
from tests.fixtures.tcp_proxy import SwitchableProxy

ANALYSES = ("saxs_average", "peak_stats")


def settings_for(tmp_path, issuer="http://127.0.0.1:9", prefect="http://127.0.0.1:9/api", **kw):
    return TriggerSettings(issuer=issuer, prefect_api_url=prefect, client_secret="blueapi-dev-secret",
                           state_dir=tmp_path / "trigger", max_backoff=1.0, **kw)


# ------------------------------------------------------------------ pure decisions
def test_decisions_from_start_documents(tmp_path):
    trig = AnalysisTrigger(settings_for(tmp_path, plan_analyses={"count": ["peak_stats"]}), token="t",
                           start_sender=False)
    assert trig.analyses_for({"analyses": ["saxs_average", "saxs_average", "bad name"]}) == ["saxs_average"]
    assert trig.analyses_for({"plan_name": "count"}) == ["peak_stats"]
    assert trig.analyses_for({"plan_name": "other"}) == []
    trig("start", {"uid": "u1", "analyses": ["saxs_average"], "visit": "a1"})
    trig("start", {"uid": "u2", "analyses": ["saxs_average"], "data_session": "a2"})
    trig("start", {"uid": "u3", "analyses": ["saxs_average"]})                     # no visit: nothing
    trig("start", {"uid": "u4", "analyses": ["saxs_average"], "instrument_session": "a/1"})  # bad visit
    keys = {r.key for r in trig.outbox.requests()}
    assert keys == {"saxs_average/live/a1/u1", "saxs_average/live/a2/u2"}
    assert any("no instrument_session" in d for d in trig.decisions)
    trig("stop", {"run_start": "u1", "exit_status": "abort"})
    trig("stop", {"run_start": "u2", "exit_status": "success"})
    keys = {r.key for r in trig.outbox.requests()}
    assert "saxs_average/post/a2/u2" in keys and "saxs_average/post/a1/u1" not in keys
    trig.close()


def test_callback_never_raises(tmp_path):
    def broken_token():
        raise RuntimeError("token service exploded")

    trig = AnalysisTrigger(settings_for(tmp_path), token=broken_token, start_sender=False)
    trig("start", {"uid": "u1", "analyses": ["saxs_average"], "visit": "a1"})
    trig("start", {"no uid": True, "analyses": ["x"]})   # malformed document
    trig("stop", {})
    assert trig.outbox.requests() == [] and any("no user token" in d for d in trig.decisions)
    trig.close()


def test_outbox_deduplicates_and_survives_reopen(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    assert box.add_request("k", "a", "live", "v", "r") is True
    assert box.add_request("k", "a", "live", "v", "r") is False
    box.add_grant("a", "v", "r")
    box.close()
    box = Outbox(tmp_path / "o.sqlite")
    assert len(box.requests()) == 1 and box.pending_count() == 2
    assert oct((tmp_path / "o.sqlite").stat().st_mode & 0o777) == "0o600"


# ------------------------------------------------------------------ end to end
def analysis_plan(det, saxs, motor, md):
    import bluesky.plans as bp

    from visitflow.trigger.plans import uses_analyses

    @uses_analyses(*ANALYSES)
    def my_scan():
        return (yield from bp.scan([det, saxs], motor, -2, 2, 12, md=md))

    return my_scan()


def runs_for(stack, uid):
    return stack.api.flow_runs(tags=[f"run:{uid}"])


def store_attempted(trig, uid: str):
    """The trigger's own outcome while Prefect is away: each of the run's grants exchanged at
    the IdP and at least one attempt to store it in Prefect failed (attempts counted, the error
    kept, retried later).  Until a grant is stored no flow run can be created."""
    grants = [trig.outbox.grant(a, "a1", uid) for a in ANALYSES]
    return all(g is not None and g.state == "store" and g.attempts >= 1 and g.error for g in grants) and grants


@pytest.mark.e2e
def test_scan_with_trigger_runs_each_analysis_live_and_post_once(tmp_path, idp, tiled_server, prefect_stack):
    token = idp.token("alice")
    trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer, prefect_stack.api_url), token=token)
    docs = []
    uid = run_scan(tiled_server.uri, token, plan=analysis_plan,
                   subscribers=[trig, lambda n, d: docs.append((n, d))])
    assert trig.flush(60), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
    # A duplicated start and stop document (a replayed stream) changes nothing.
    for name, doc in docs:
        if name in ("start", "stop"):
            trig(name, doc)
    assert trig.flush(30)
    trig.close()
    runs = runs_for(prefect_stack, uid)
    assert sorted((r["name"].split()[0]) for r in runs) == sorted(
        f"{a.replace('_', '-')}/{v}" for a in ANALYSES for v in ("live", "post"))
    for r in runs:
        assert r["parameters"] == {"visit": "a1", "run_id": uid}
        blob = json.dumps({"p": r["parameters"], "j": r.get("job_variables"), "n": r["name"], "t": r["tags"]})
        assert "eyJ" not in blob, "a JWT leaked into parameters, job variables, name or tags"
    for r in runs:
        done = prefect_stack.api.wait_for_flow_run(r["id"], timeout=240)
        assert done["state"]["type"] == "COMPLETED", prefect_stack.logs(r["id"])
    processed = user_root(tiled_server.uri, idp.token("alice"))[f"processed/a1/{uid}"]
    assert set(processed) == set(ANALYSES)
    for a in ANALYSES:
        node = processed[a]
        assert node.metadata["current"].startswith("post-")
        assert set(k.split("-")[0] for k in node) == {"live", "post"}
        # live == post on real servers, for every shipped analysis
        live, post = node["live"], node[node.metadata["current"]]
        assert live.metadata["frames_processed"] == post.metadata["frames_processed"] == 12
        assert post.metadata["outputs"], f"{a}: the post result lists no outputs"
        for key in post.metadata["outputs"]:
            got = live[key].read() if key in live else live.metadata["scalars"][key]
            want = post[key].read() if key in post else post.metadata["scalars"][key]
            np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-6,
                                       err_msg=f"{a}.{key}")


@pytest.mark.e2e
def test_prefect_down_during_scan_then_back(tmp_path, idp, tiled_server, prefect_stack):
    port = int(prefect_stack.api_url.rsplit(":", 1)[1].split("/")[0])
    proxy = SwitchableProxy(port, enabled=False)
    token = idp.token("alice")
    trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer, f"http://127.0.0.1:{proxy.port}/api"), token=token)
    # The scan completes with Prefect down: the trigger only queues (its time per document is
    # measured by benchmarks/trigger_documents.py, not asserted here).
    uid = run_scan(tiled_server.uri, token, plan=analysis_plan, subscribers=[trig])
    wait_until(lambda: store_attempted(trig, uid), 60, "the sender never tried to store a grant in Prefect")
    assert proxy.refused > 0, "the trigger did try to reach Prefect"
    assert runs_for(prefect_stack, uid) == []
    pending = {r.key for r in trig.outbox.requests("pending")}
    assert len(pending) == 4, pending
    assert {r.key for r in trig.outbox.requests()} == pending, "every flow run waits in the outbox"
    proxy.enabled = True
    assert trig.flush(60), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
    trig.close()
    # A new trigger process on the same outbox (blueapi restarted) sends nothing twice.
    again = AnalysisTrigger(settings_for(tmp_path, idp.issuer, prefect_stack.api_url), token=token)
    assert again.flush(5)
    assert {r.state for r in again.outbox.requests()} == {"done"}
    again.close()
    runs = runs_for(prefect_stack, uid)
    assert len(runs) == 4, [r["name"] for r in runs]
    proxy.close()


@pytest.mark.e2e
def test_user_without_run_scope_gets_no_flow_run(tmp_path, idp, tiled_server, prefect_stack):
    token = idp.token("carol")
    trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer, prefect_stack.api_url), token=token)
    uid = run_scan(tiled_server.uri, token, plan=analysis_plan, subscribers=[trig])
    assert trig.flush(30), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
    states = {r.state for r in trig.outbox.requests()}
    trig.close()
    assert runs_for(prefect_stack, uid) == []
    refused = [d for d in trig.decisions if d.startswith("REFUSED")]
    assert len(refused) == 2 and all("invalid_scope" in d and "run:" in d for d in refused), trig.decisions
    assert states == {"refused"}


# ------------------------------------------------------------------ user token lifetime
def _sender_once(trig, prefect_url="http://127.0.0.1:9/api"):
    from visitflow.core.prefect_api import PrefectAPI

    with PrefectAPI(prefect_url, attempts=1) as api:
        trig.send_once(api)


def test_a_document_may_bring_its_own_token(tmp_path):
    trig = AnalysisTrigger(settings_for(tmp_path), token="default", start_sender=False)
    trig("start", {"uid": "u1", "analyses": ["peak_stats"], "visit": "a1"}, token="from-the-task")
    trig("start", {"uid": "u2", "analyses": ["peak_stats"], "visit": "a1"})
    assert trig.holds_token_for("u1") and trig._user_tokens == {"u1": "from-the-task", "u2": "default"}
    trig.close()


def test_user_token_dropped_once_the_runs_grants_are_obtained(tmp_path, idp):
    """Real IdP; Prefect unreachable, so the grants wait on disk but the user token is gone."""
    trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer), token=idp.token("alice"), start_sender=False)
    trig("start", {"uid": "u1", "analyses": list(ANALYSES), "instrument_session": "a1"})
    assert trig.holds_token_for("u1")
    _sender_once(trig)
    assert {trig.outbox.grant(a, "a1", "u1").state for a in ANALYSES} == {"store"}   # exchanged, not stored
    assert not trig.holds_token_for("u1"), "the user's token outlived the exchange"
    assert {r.state for r in trig.outbox.requests()} == {"pending"}   # the flow runs still get made
    trig.close()


def test_user_token_dropped_when_the_exchange_is_finally_refused(tmp_path, idp):
    trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer), token=idp.token("carol"), start_sender=False)
    trig("start", {"uid": "u1", "analyses": list(ANALYSES), "instrument_session": "a1"})
    _sender_once(trig)
    assert not trig.holds_token_for("u1")
    assert {r.state for r in trig.outbox.requests()} == {"refused"}
    trig.close()


def test_user_token_kept_while_the_idp_cannot_answer(tmp_path, idp):
    """An unreachable IdP is retried: the token is still needed, so it stays (in memory)."""
    trig = AnalysisTrigger(settings_for(tmp_path, "http://127.0.0.1:9"), token=idp.token("alice"), start_sender=False)
    trig("start", {"uid": "u1", "analyses": ["peak_stats"], "instrument_session": "a1"})
    _sender_once(trig)
    assert trig.holds_token_for("u1") and trig.outbox.pending_count() == 2
    trig.close()


def test_manual_request_is_a_new_key_each_time(tmp_path):
    trig = AnalysisTrigger(settings_for(tmp_path), token="t", start_sender=False)
    first = trig.request("peak_stats", "a1", "r1", ("post",))
    second = trig.request("peak_stats", "a1", "r1", ("post",))
    base = "peak_stats/post/a1/r1"
    assert first != second and all(k.startswith(base + "/rerun-") for k in first + second)
    assert len(trig.outbox.requests("pending")) == 2 and trig.outbox.grant("peak_stats", "a1", "r1").state == "exchange"
    trig.close()


def test_light_distribution_ships_everything_the_trigger_imports():
    """visitflow-trigger/pyproject.toml lists source files; the trigger's visitflow imports
    (transitively, at module level or inside functions) must all be in it, and none heavy."""
    import ast
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    config = tomllib.loads((repo / "visitflow-trigger" / "pyproject.toml").read_text())
    shipped = set()
    for src in config["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]:
        path = (repo / "visitflow-trigger" / src).resolve()
        shipped |= set(path.glob("*.py")) if path.is_dir() else {path}
    todo, seen, third_party = sorted((repo / "visitflow" / "trigger").glob("*.py")), set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                parts = (node.module or "").split(".") if node.module else []
                targets = [base.joinpath(*parts)] if parts else [base / a.name for a in node.names]
                for t in targets:
                    for cand in (t.with_suffix(".py"), t / "__init__.py"):
                        if cand.exists():
                            todo.append(cand)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                third_party |= {n.split(".")[0] for n in names if n}
    missing = sorted(str(p.relative_to(repo)) for p in seen - shipped)
    assert missing == [], f"the trigger imports files visitflow-trigger does not ship: {missing}"
    assert not third_party & {"prefect", "tiled", "fastapi", "starlette", "uvicorn", "authlib"}, third_party
