"""The real blueapi 1.21.1 server with visitflow's trigger installed in its own environment,
driven through blueapi's REST API; raw data written by blueapi's own TiledWriter.

Marker ``blueapi``; the stack is tests/fixtures/blueapi_stack.py (real IdP, Tiled, Prefect server and
warm worker, ``blueapi serve``)."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time

import pytest

from visitflow import errors

from visitflow.core import names as grants
from visitflow.core.prefect_api import PrefectAPI
from visitflow.core.tiled_client import BearerAuth, connect
from visitflow.flow.sink import read_result

from tests.fixtures.waiting import wait_until
from tests.fixtures import blueapi_stack as bs
from tests.fixtures.references import assert_matches, reference_of

pytestmark = pytest.mark.blueapi
ANALYSES = ("peak_stats",)   # scalars only: see deployments/blueapi/visitflow_example_plans.py


def flow_runs_of(api: PrefectAPI, uid: str) -> list[dict]:
    return api.flow_runs(tags=[f"run:{uid}"])


def wait_flow_runs(api: PrefectAPI, uid: str, n: int, timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = flow_runs_of(api, uid)
        if len(runs) >= n or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def raw_run(stack, token: str, uid: str):
    root = connect(stack.tiled.uri, BearerAuth(lambda: token))
    return root[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{uid}"]


def run_uid(task: dict) -> str:
    assert task["errors"] == [], task
    assert task["outcome"]["outcome"] == "success", task
    return task["outcome"]["result"]


def outbox_rows(blueapi, uid: str) -> tuple[list[dict], list[dict]]:
    """The trigger's own record of run ``uid`` inside blueapi: its outbox rows (grants,
    requests), read-only from the trigger's state directory."""
    path = blueapi.blueapi.trigger_state / "outbox.sqlite"
    assert path.exists(), f"no trigger outbox at {path}: the trigger is not attached to blueapi's tasks"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        grants = [dict(r) for r in db.execute("SELECT analysis, state, attempts, error FROM grants WHERE run = ?",
                                              (uid,))]
        requests = [dict(r) for r in db.execute("SELECT key, variant, state, flow_run_id, error FROM requests "
                                                "WHERE run = ?", (uid,))]
    finally:
        db.close()
    return grants, requests


def settled(blueapi, uid: str):
    """(grants, requests) once the trigger has decided every one of the run's requests
    (nothing left to exchange, store, create or record); None before."""
    grants, requests = outbox_rows(blueapi, uid)
    if requests and not {r["state"] for r in requests} & {"pending", "report"} \
            and not {g["state"] for g in grants} & {"exchange", "store"}:
        return grants, requests
    return None


def outputs_of(result_node) -> dict:
    out = dict(result_node.metadata.get("scalars", {}))
    for key, child in result_node.items():
        if key != "scalars":
            out[key] = child.read()
    return out


# ------------------------------------------------------------------ the environment
def test_blueapi_venv_is_clean_and_light(blueapi_venv):
    py = str(blueapi_venv)
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    freeze = subprocess.run([py, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    before = (bs.VENV / "freeze-blueapi-only.txt").read_text().splitlines()
    added = sorted(set(freeze) - set(before))
    assert [a.split(" @ ")[0].split("==")[0] for a in added] == ["visitflow-trigger"], added
    assert sorted(set(before) - set(freeze)) == [], "installing the trigger changed blueapi's environment"
    assert {"blueapi==1.21.1", "tiled==0.2.18", "event-model==1.24.0", "h5py==3.16.0"} <= set(freeze)  # h5py: detector plans
    probe = subprocess.run(
        [py, "-c", "import importlib.util, sys\n"
                   "import visitflow.trigger.blueapi_hook, visitflow.trigger.plans, visitflow.trigger.cli\n"
                   "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'fastapi_users')"
                   " or m.startswith('tiled.server'))\n"
                   "print(heavy)\n"
                   "print(importlib.util.find_spec('prefect'))\n"],
        capture_output=True, text=True, env={"VISITFLOW_TRIGGER_NO_INSTALL": "1", "PATH": "/usr/bin:/bin"})
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[:2] == ["[]", "None"], probe.stdout
    no_prefect = subprocess.run([py, "-c", "import prefect"], capture_output=True, text=True)
    assert no_prefect.returncode != 0 and "No module named 'prefect'" in no_prefect.stderr


def test_hook_settings_refuse_what_is_missing_or_unknown(tmp_path, monkeypatch):
    """Pure: a broken hook configuration is a clear message, never an exception into blueapi."""
    monkeypatch.setenv("VISITFLOW_TRIGGER_NO_INSTALL", "1")
    from visitflow.trigger import blueapi_hook as hook

    cfg = tmp_path / "t.yaml"
    cfg.write_text("issuer: http://idp\nprefect_api_url: http://p/api\nstate_dir: /tmp/x\npost_on: [success, abort]\n")
    env = {hook.CONFIG_ENV: str(cfg), "VISITFLOW_TRIGGER_CLIENT_SECRET": "s"}
    s = hook.load_settings(env)
    assert (s.issuer, s.client_secret, s.post_on, str(s.state_dir)) == ("http://idp", "s", ("success", "abort"), "/tmp/x")
    assert hook.load_settings({**env, "VISITFLOW_ISSUER": "http://other"}).issuer == "http://other"
    with pytest.raises(errors.ConfigError, match="no client secret"):
        hook.load_settings({hook.CONFIG_ENV: str(cfg)})
    with pytest.raises(errors.ConfigError, match="'issuer' is not set"):
        hook.load_settings({"VISITFLOW_TRIGGER_CLIENT_SECRET": "s"})
    cfg.write_text("issuer: x\nprefect_api_url: y\nprefect_url: typo\n")
    with pytest.raises(errors.ConfigError, match="unknown visitflow trigger settings \\['prefect_url'\\]"):
        hook.load_settings(env)
    assert hook.install() is False   # no blueapi in this environment: logged, not raised
    assert hook.bearer_from_headers({"Authorization": "Bearer abc ", "traceparent": "x"}) == "abc"
    assert hook.bearer_from_headers({"authorization": "bearer abc"}) == "abc"
    assert hook.bearer_from_headers({"authorization": "Basic abc"}) is None
    assert hook.bearer_from_headers(None) is None and hook.bearer_from_headers(object()) is None


class _Interface:
    """A stand-in for ``blueapi.service.interface`` (pure: only the two names the hook replaces)."""

    def __init__(self, begin_task, writer=object):
        self.begin_task = begin_task
        self.TiledWriter = writer


def test_hook_refuses_a_blueapi_whose_seam_changed_with_one_error_line(tmp_path, monkeypatch, caplog):
    """blueapi renamed ``pass_through_headers`` or dropped ``TiledWriter``: ONE ERROR line naming
    the tested versions, nothing replaced, nothing raised (blueapi runs on without the trigger)."""
    monkeypatch.setenv("VISITFLOW_TRIGGER_NO_INSTALL", "1")
    from visitflow.trigger import blueapi_hook as hook
    from visitflow.trigger.callback import TriggerSettings

    settings = TriggerSettings(issuer="http://idp", prefect_api_url="http://p/api", client_secret="s",
                               state_dir=tmp_path)

    def renamed(task, headers=None):        # a blueapi that renamed the parameter
        return task

    def current(task, pass_through_headers=None):
        return task

    for iface, why in ((_Interface(renamed), "begin_task takes no pass_through_headers"),
                       (_Interface(current, writer=None), "has no TiledWriter")):
        caplog.clear()
        before = (iface.begin_task, iface.TiledWriter)
        with caplog.at_level("INFO", logger="visitflow.trigger.blueapi"):
            assert hook.install(settings, interface=iface) is False
        lines = [r for r in caplog.records if r.name == "visitflow.trigger.blueapi"]
        assert [r.levelname for r in lines] == ["ERROR"], lines
        msg = lines[0].getMessage()
        assert why in msg and "tested with blueapi 1.21.1" in msg and msg.startswith("visitflow trigger NOT installed"), msg
        assert (iface.begin_task, iface.TiledWriter) == before


def test_hook_hands_the_writer_the_callers_token_from_pass_through_headers(tmp_path, monkeypatch):
    """The token comes from begin_task's pass-through headers, not from the Tiled client (which
    in service-account mode is the service account): the writer built inside begin_task sees it,
    and nothing after the call does."""
    monkeypatch.setenv("VISITFLOW_TRIGGER_NO_INSTALL", "1")
    from visitflow.trigger import blueapi_hook as hook
    from visitflow.trigger.callback import TriggerSettings

    seen = {}

    def begin_task(task, pass_through_headers=None):
        seen["token"] = hook._caller_token.get()
        seen["headers"] = pass_through_headers
        return task

    iface = _Interface(begin_task, writer=object)
    settings = TriggerSettings(issuer="http://idp", prefect_api_url="http://p/api", client_secret="s",
                               state_dir=tmp_path)
    monkeypatch.setattr(hook, "_settings", None)
    assert hook.install(settings, interface=iface) is True
    assert iface.begin_task.__name__ == "begin_task" and iface.begin_task.__wrapped__ is begin_task
    headers = {"authorization": "Bearer caller-token", "traceparent": "00-1"}
    assert iface.begin_task("T", pass_through_headers=headers) == "T"
    assert seen == {"token": "caller-token", "headers": headers}
    assert iface.begin_task("T") == "T" and seen["token"] is None    # no header: no token
    assert hook._caller_token.get() is None
    wrapped = iface.begin_task
    assert hook.install(settings, interface=iface) is True and iface.begin_task is wrapped   # idempotent


# ------------------------------------------------------------------ end to end
def test_alice_task_triggers_live_and_post_with_her_rights(blueapi, prefect):
    alice = blueapi.token("alice")
    task = blueapi.blueapi.run(alice, "peak_scan", {"num": 12, "seed": 3})
    uid = run_uid(task)
    assert task["task"]["metadata"]["instrument_session"] == bs.SESSION

    # blueapi's own TiledWriter wrote the run under its layout, with Alice's token.
    run = raw_run(blueapi, alice, uid)
    start = run.metadata["start"]
    assert start["analyses"] == list(ANALYSES) and start["instrument_session"] == bs.SESSION
    assert start["plan_name"] == "peak_scan" and start["user"] == bs.FEDIDS["alice"]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run["primary"]["det"].read().shape == (12,)

    runs = wait_flow_runs(prefect, uid, 2 * len(ANALYSES))
    keys = sorted((next(t for t in r["tags"] if t.startswith("analysis:")),
                   next(t for t in r["tags"] if t.startswith("variant:"))) for r in runs)
    assert keys == sorted((f"analysis:{a}", f"variant:{v}") for a in ANALYSES for v in ("live", "post")), keys
    for r in runs:
        assert r["parameters"] == {"visit": bs.SESSION, "run_id": uid}
        done = prefect.wait_for_flow_run(r["id"], timeout=300)
        assert done["state"]["type"] == "COMPLETED", (r["name"], done["state"])
    # The trigger's own record: each request created its flow run and nothing is left to send,
    # so the count below is final.
    _, requests = wait_until(lambda: settled(blueapi, uid), 60, f"the trigger did not settle run {uid}")
    assert sorted((r["key"].split("/")[0], r["variant"], r["state"]) for r in requests) == sorted(
        (a, v, "done") for a in ANALYSES for v in ("live", "post")), requests
    assert {r["flow_run_id"] for r in requests} == {r["id"] for r in runs}
    assert len(flow_runs_of(prefect, uid)) == 2 * len(ANALYSES), "exactly one live and one post per analysis"

    # Results under the same session, read by Alice with her own token, equal numpy.
    root = connect(blueapi.tiled.uri, BearerAuth(lambda: alice))
    primary = raw_run(blueapi, alice, uid)["primary"]
    for analysis in ANALYSES:
        want = reference_of(analysis, primary)
        node = root[f"processed/{bs.SESSION}/{uid}/{analysis}"]
        children = {"live": node["live"], "post": next(node[k] for k in node if k.startswith("post-"))}
        assert read_result(node) is not None
        for variant, child in children.items():
            got = outputs_of(child)
            assert child.metadata["status"] == "complete", (analysis, variant, child.metadata)
            assert_matches(got, want, rtol=1e-9, atol=1e-9, where=f"{analysis}/{variant}/")
    meta = root[f"processed/{bs.SESSION}/{uid}/peak_stats"]["live"].metadata
    assert meta["token_sub"] == "alice" and meta["visit"] == bs.SESSION and meta["run_id"] == uid
    assert meta["user"] == bs.FEDIDS["alice"]          # the start document's user, kept in provenance
    assert f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{uid}" in meta["raw_uri"]
    assert re.search(rf"visitflow trigger: created peak_stats/post/{bs.SESSION}/{uid} flow run", blueapi.blueapi.log())

    # Bob, with no rights on the session, sees neither the raw run nor the results.
    bob = blueapi.token("bob")
    assert blueapi.tiled.get(f"metadata/{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{uid}", bob).status_code == 404
    assert blueapi.tiled.get(f"metadata/processed/{bs.SESSION}/{uid}", bob).status_code == 404


def test_carol_task_completes_but_no_flow_run_and_the_log_says_why(blueapi, prefect):
    carol = blueapi.token("carol")
    uid = run_uid(blueapi.blueapi.run(carol, "peak_scan", {"num": 4}))
    run = raw_run(blueapi, carol, uid)
    assert run.metadata["stop"]["exit_status"] == "success" and len(run["primary"]["det"].read()) == 4
    deadline = time.monotonic() + 60
    pattern = re.compile(rf"REFUSED (peak_stats) for visit {bs.SESSION} run {uid}: the IdP says "
                         r"invalid_scope.*run:\1:" + re.escape(bs.SESSION))
    while len(set(m[1] for m in pattern.finditer(blueapi.blueapi.log()))) < len(ANALYSES) and time.monotonic() < deadline:
        time.sleep(0.3)
    refusals = {m[1] for m in pattern.finditer(blueapi.blueapi.log())}
    assert refusals == set(ANALYSES), blueapi.blueapi.log()[-3000:]
    # The trigger's own record: the grant refused and both flow runs dropped, nothing left to send.
    grants, requests = wait_until(lambda: settled(blueapi, uid), 60, f"the trigger did not settle run {uid}")
    assert {(g["analysis"], g["state"]) for g in grants} == {(a, "refused") for a in ANALYSES}, grants
    assert sorted((r["variant"], r["state"], r["flow_run_id"]) for r in requests) == sorted(
        (v, "refused", None) for _ in ANALYSES for v in ("live", "post")), requests
    assert flow_runs_of(prefect, uid) == []


def test_prefect_unreachable_task_completes_and_runs_appear_later(blueapi, prefect):
    alice = blueapi.token("alice")
    blueapi.proxy.cut()
    try:
        t0 = time.monotonic()
        uid = run_uid(blueapi.blueapi.run(alice, "peak_scan", {"num": 6}))
        took = time.monotonic() - t0

        def store_failed():   # the trigger's own record: exchanged, and storing it in Prefect failed
            grants, requests = outbox_rows(blueapi, uid)
            done = grants and all(g["state"] == "store" and g["attempts"] >= 1 and g["error"] for g in grants)
            return done and (grants, requests)

        grants, requests = wait_until(store_failed, 60, "the trigger never tried to store its grant in Prefect")
        assert {g["analysis"] for g in grants} == set(ANALYSES), grants
        assert sorted((r["variant"], r["state"]) for r in requests) == sorted(
            (v, "pending") for _ in ANALYSES for v in ("live", "post")), requests
        assert flow_runs_of(prefect, uid) == []   # no flow run before its grant is stored
        assert blueapi.proxy.refused > 0, "the trigger did try to reach Prefect"
    finally:
        blueapi.proxy.enabled = True
    runs = wait_flow_runs(prefect, uid, 2 * len(ANALYSES), timeout=120)
    assert len(runs) == 2 * len(ANALYSES), runs
    for r in runs:
        assert prefect.wait_for_flow_run(r["id"], timeout=300)["state"]["type"] == "COMPLETED", r["name"]
    print(f"task with Prefect unreachable took {took:.1f}s")


def test_plan_without_analyses_runs_as_if_visitflow_were_absent(blueapi, prefect):
    alice = blueapi.token("alice")
    uid = run_uid(blueapi.blueapi.run(alice, "plain_scan", {"num": 3}))
    run = raw_run(blueapi, alice, uid)
    assert "analyses" not in run.metadata["start"] and run.metadata["stop"]["exit_status"] == "success"
    # The trigger decides in the RunEngine's thread (TriggeringTiledWriter calls it for each
    # document), so by the time the task is complete it has decided: nothing queued for this
    # run is nothing its sender will ever send.
    assert outbox_rows(blueapi, uid) == ([], []), "the trigger queued something for a run without analyses"
    assert flow_runs_of(prefect, uid) == []
    ours = [line for line in blueapi.blueapi.log().splitlines() if "visitflow" in line and uid in line]
    assert ours == [], "the trigger said something about a run without analyses"


def test_manual_rerun_makes_a_new_flow_run_each_time(blueapi, prefect):
    """``visitflow trigger`` for a run whose post analysis already completed: a new flow run
    each time it is asked, with its name, link and (--wait) final state printed."""
    alice = blueapi.token("alice")
    uid = run_uid(blueapi.blueapi.run(alice, "peak_scan", {"num": 4}))
    first = wait_flow_runs(prefect, uid, 2 * len(ANALYSES))
    assert len(first) == 2 * len(ANALYSES), first
    for r in first:
        prefect.wait_for_flow_run(r["id"], timeout=300)
    env = {"VISITFLOW_TRIGGER_CLIENT_SECRET": "blueapi-dev-secret", "VISITFLOW_PASSWORD": "alice"}
    argv = [sys.executable, "-m", "visitflow.cli", "trigger", "--analysis", "peak_stats", "--visit", bs.SESSION,
            "--run", uid, "--instrument", bs.INSTRUMENT, "--variant", "post", "--user", "alice",
            "--issuer", blueapi.idp.issuer,
            "--prefect-api", blueapi.prefect_api, "--wait"]
    import os

    ids = []
    for _ in range(2):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        assert out.returncode == 0, out.stdout + out.stderr
        m = re.search(r"^(peak-stats/post \S+ \S+): COMPLETED  flow run (\S+)  -> (\S+)$", out.stdout, re.M)
        assert m, out.stdout
        assert m[3] == f"{blueapi.prefect_api[:-4]}/runs/flow-run/{m[2]}"
        ids.append(m[2])
    before = {r["id"] for r in first}
    assert len(set(ids)) == 2 and not set(ids) & before
    posts = [r for r in flow_runs_of(prefect, uid) if "variant:post" in r["tags"] and "analysis:peak_stats" in r["tags"]]
    assert len(posts) == 3
    for fr in ids:
        assert prefect.flow_run(fr)["idempotency_key"].startswith(
            grants.idempotency_key("peak_stats", "post", bs.SESSION, uid) + "/rerun-")


def test_anonymous_gets_nothing_from_the_tiled_blueapi_writes_to(blueapi):
    """That Tiled lets anonymous requests in (blueapi's tiled[client] 0.2.18 needs it to send
    the pass-through header at all): they must see and do nothing, and bad tokens stay 401."""
    alice = blueapi.token("alice")
    uid = run_uid(blueapi.blueapi.run(alice, "plain_scan", {"num": 2}))
    session = f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}"
    assert blueapi.tiled.get(f"metadata/{session}/{uid}", alice).status_code == 200
    for path in ("", bs.INSTRUMENT, session, "processed"):
        r = blueapi.tiled.get(f"search/{path}")
        assert r.status_code in (401, 403, 404) or r.json()["data"] == [], (path, r.status_code, r.text[:300])
    assert blueapi.tiled.get(f"metadata/{session}/{uid}").status_code in (401, 403, 404)
    assert blueapi.tiled.get(f"array/full/{session}/{uid}/primary/internal").status_code in (401, 403, 404)
    r = blueapi.tiled.request("POST", f"metadata/{session}", json={
        "metadata": {}, "structure_family": "container", "specs": [], "data_sources": [], "id": "anon"})
    assert r.status_code in (401, 403, 404), r.text
    bad = blueapi.idp.sign(blueapi.idp.claims(aud=["tiled"]), key=blueapi.idp.other_key)
    assert blueapi.tiled.get(f"metadata/{session}/{uid}", bad).status_code == 401
