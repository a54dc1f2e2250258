"""``python -m benchmarks``: start what is needed, measure P1–P7 side by side, print one table.

P1  start document → flow body running: stock process worker vs the warm ``visitflow`` worker
P2  live lag: raw frame written → processed update readable (p50/p95): the deployed live flow,
    and side by side on the same run two engine processes, one following by push, one polling
P3  post read throughput: naive ``[:]`` vs ours (TiledRawRun) vs the best plain-tiled path
P4  live CPU (push, and poll) vs post CPU on the same 1,000 frames (written 10 at a time)
P5  live peak RSS at n vs 10n frames (incremental form)
P6  authorised Tiled metadata GET (JWT + policy) vs API-key GET  (benchmarks/tiled_auth.py)
P7  a burst of 100 triggers, 20 concurrent analyses: all run, once; p95 start
P8  post read of a registered HDF5 detector file (200×1024² uint32) vs h5py on the file
    (P3 and P8 also have a ceiling: the same array read straight from its storage; see
    benchmarks/post_read.py, which runs them on their own)

Everything runs on loopback against real servers; numbers are ratios measured in the same
run.  Writes ``benchmarks/RESULTS.md`` with the machine, the date and the load average at
the start and end (warned about when above 1: the absolute numbers are then inflated).  ``--quick`` shrinks sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visitflow.core import names as grants, oauth  # noqa: E402
from visitflow.core.prefect_api import PrefectAPI  # noqa: E402
from visitflow.stack.services import free_port  # noqa: E402
from visitflow.stack import prefect as pstack  # noqa: E402
from visitflow.stack.local import DEV_SECRETS, LocalStack, StackConfig  # noqa: E402


#: RESULTS.md below this line is written by hand (profiles, other benchmarks' summaries) and kept
#: by every run, which rewrites only what is above it
KEEP_MARKER = "<!-- python -m benchmarks rewrites everything above this line and keeps everything below it -->"


def merge_kept(previous: str | None, generated: str) -> str:
    """``generated`` followed by the hand-written part of ``previous`` (from :data:`KEEP_MARKER`
    on); just ``generated`` plus the marker when there is none yet."""
    kept = ""
    if previous and KEEP_MARKER in previous:
        kept = previous.split(KEEP_MARKER, 1)[1].lstrip("\n")
    return generated.rstrip("\n") + "\n\n" + KEEP_MARKER + "\n\n" + kept


#: ``VISITFLOW_BENCH_BASELINE=<a checkout of another revision>``: P2 and P4 also run that
#: checkout's engine probes on the same scan, side by side with this tree's (before/after in
#: one run).  ``git archive <rev> | tar -x -C <dir>`` makes one without touching any worktree.
BASELINE = Path(os.environ["VISITFLOW_BENCH_BASELINE"]).resolve() if os.environ.get("VISITFLOW_BENCH_BASELINE") else None
BASELINE_REV = os.environ.get("VISITFLOW_BENCH_BASELINE_REV") or (BASELINE.name if BASELINE else "")


def pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def log(msg):
    print(f"[bench] {msg}", flush=True)


class Bench:
    def __init__(self, tmp: Path, quick: bool):
        self.tmp, self.quick = tmp, quick
        self.config = StackConfig(state_dir=tmp / "stack", idp_port=free_port(), tiled_port=free_port(),
                                  prefect_port=free_port(), worker_health_port=free_port(), ui=False,
                                  worker_type="visitflow", live_per_visit=30,
                                  raw_file_root=str(tmp / "beamline") + "/{visit}")
        self.files = tmp / "beamline"
        (self.files / "a1").mkdir(parents=True, exist_ok=True)
        self.stack = LocalStack(self.config)
        self.rows: list[tuple[str, str, str, str]] = []

    # ------------------------------------------------------------------ setup
    def up(self):
        t0 = time.monotonic()
        self.stack.up()
        c = self.config
        self.env = pstack.prefect_env(c.prefect_api, self.stack.state / "prefect", self.stack.prefect_auth)
        self.api = PrefectAPI(c.prefect_api, self.stack.prefect_auth, timeout=30)
        # A second pool served by Prefect's stock process worker, and a probe flow on both.
        pstack.run_cli(["work-pool", "create", "bench-stock", "--type", "process", "--overwrite"], self.env)
        pstack.run_cli(["work-pool", "set-concurrency-limit", pstack.POOL, "20"], self.env)  # P7: 20 at once
        for pool in (pstack.POOL, "bench-stock"):
            flow = self.api.request("POST", "/flows/", json={"name": "probe"})
            self.api.request("POST", "/deployments/", json={
                "name": pool, "flow_id": flow["id"], "entrypoint": "probe_flows.py:probe",
                "path": str(REPO / "benchmarks"), "work_pool_name": pool, "enforce_parameter_schema": False,
                "pull_steps": [{"prefect.deployments.steps.set_working_directory":
                                {"directory": str(REPO / "benchmarks")}}]})
        self.stock = pstack.start_worker(self.stack.state, self.env, health_port=free_port(), name="bench-stock",
                                         client_secret=DEV_SECRETS["visitflow"], worker_type="process",
                                         pool="bench-stock")
        self.stock.wait_ready(120)
        self.token_url = oauth.token_endpoint(c.issuer)
        log(f"stack up in {time.monotonic() - t0:.0f}s")

    def alice(self):
        return oauth.password_login(self.token_url, "alice", "alice").access_token

    def root(self, token=None, compression=False):
        from visitflow.core.tiled_client import BearerAuth, connect

        # Without a given token, log in again when alice's expires (BearerAuth refreshes from
        # the JWT's exp): under load P5's 10,000-frame scan outlived one token.
        provider = (lambda: token) if token else self.alice
        return connect(self.config.tiled_uri, BearerAuth(provider), compression=compression)

    def down(self):
        try:
            self.stock.stop()
        finally:
            self.stack.down()

    # ------------------------------------------------------------------ helpers
    def scan(self, num, shape, delay=0.0, subscribers=(), batch_size=1, seed=0, md=None):
        from bluesky import RunEngine
        from bluesky_tiled_plugins import TiledWriter

        from visitflow.stack.sim import make_devices, motor_scan

        motor, det, saxs = make_devices(shape, seed=seed)
        RE = RunEngine({}, context_managers=[])
        RE.subscribe(TiledWriter(self.root()["raw"]["a1"], batch_size=batch_size))
        for cb in subscribers:
            RE.subscribe(cb)
        (uid,) = RE(motor_scan([det, saxs], motor, num, delay=delay, md={"instrument_session": "a1", **(md or {})}))
        return uid

    def delegate(self, analysis, uid):
        from visitflow.core.scopes import grant_scopes

        grant = oauth.exchange(self.token_url, self.alice(), client_id="blueapi",
                               client_secret=DEV_SECRETS["blueapi"], audience="visitflow",
                               scope=str(grant_scopes(analysis, "a1", uid))).access_token
        self.api.save_secret(grants.grant_secret_name(analysis, "a1", uid), grant)

    def start_latency(self, deployment, n):
        """create flow run → RUNNING (server's start_time), seconds."""
        out = []
        for _ in range(n):
            t0 = time.time()
            fr = self.api.create_flow_run(deployment, {}, idempotency_key=str(uuid.uuid4()))
            done = self.api.wait_for_flow_run(fr["id"], timeout=120, interval=0.2)
            assert done["state"]["type"] == "COMPLETED", done["state"]
            start = dt.datetime.fromisoformat(done["start_time"].replace("Z", "+00:00")).timestamp()
            out.append(start - t0)
        return out

    # ------------------------------------------------------------------ P1
    def p1(self):
        n = 5 if self.quick else 10
        stock = self.start_latency("probe/bench-stock", n)
        warm = self.start_latency(f"probe/{pstack.POOL}", n)
        trig = self.trigger_overhead(3 if self.quick else 5)
        self.rows.append(("P1 start doc → flow body running",
                          f"stock {pct(stock, 50) + pct(trig, 50):.2f}s / p95 {pct(stock, 95) + pct(trig, 95):.2f}s",
                          f"warm {pct(warm, 50) + pct(trig, 50):.2f}s / p95 {pct(warm, 95) + pct(trig, 95):.2f}s",
                          f"{(pct(stock, 50) + pct(trig, 50)) / (pct(warm, 50) + pct(trig, 50)):.1f}× faster"))
        self.details["P1"] = {"create_to_running_stock_s": stock, "create_to_running_warm_s": warm,
                              "startdoc_to_created_s": trig}

    def trigger_overhead(self, n):
        """Start document → flow run created, through the real trigger (exchange, secret, create).

        One trigger serves all runs, as in blueapi (one per process): its Prefect lookups
        (Secret block schema, deployment id) are warm after the first run, which is dropped."""
        from visitflow.trigger import AnalysisTrigger, TriggerSettings

        trig = AnalysisTrigger(TriggerSettings(issuer=self.config.issuer, prefect_api_url=self.config.prefect_api,
                                               prefect_auth_string=self.stack.prefect_auth,
                                               client_secret=DEV_SECRETS["blueapi"], live=True, post_on=(),
                                               state_dir=self.tmp / "trig-p1"), token=self.alice())
        out = []
        try:
            for i in range(n + 1):
                uid = str(uuid.uuid4())
                t0 = time.time()
                trig("start", {"uid": uid, "analyses": ["peak_stats"], "instrument_session": "a1"})
                while True:
                    reqs = [r for r in trig.outbox.requests() if r.run == uid]
                    if reqs and reqs[0].state != "pending":
                        break
                    time.sleep(0.002)
                if i:
                    out.append(time.time() - t0)
                assert reqs[0].state == "done", reqs[0]
                self.api.request("POST", f"/flow_runs/{reqs[0].flow_run_id}/set_state",
                                 json={"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True})
        finally:
            trig.close()
        return out

    # ------------------------------------------------------------------ P2
    def p2(self):
        from visitflow.trigger import AnalysisTrigger, TriggerSettings

        num, delay = (40, 0.1) if self.quick else (100, 0.1)
        written: dict[int, float] = {}
        nodes = {"flow": "saxs_average", "push": "saxs_average_push", "poll": "saxs_average_poll",
                 **({"push-base": "saxs_average_push_base", "poll-base": "saxs_average_poll_base"}
                    if BASELINE else {})}
        seen: dict[str, dict[int, float]] = {k: {} for k in nodes}
        state = {"uid": None, "n": 0, "stop": False}
        probes: dict[str, subprocess.Popen] = {}

        def after_writer(name, doc):  # subscribed after TiledWriter: the frame is in Tiled
            if name == "start":
                state["uid"] = doc["uid"]
                for kind, variant in (("push", "live-push"), ("poll", "live"),
                                      *((("push-base", "live-push"), ("poll-base", "live")) if BASELINE else ())):
                    repo = BASELINE if kind.endswith("-base") else REPO
                    probes[kind] = subprocess.Popen(
                        [sys.executable, str(repo / "benchmarks" / "engine_probe.py"), self.config.tiled_uri,
                         self.alice(), doc["uid"], variant, nodes[kind]], stdout=subprocess.PIPE, text=True)
            elif name == "event":
                written[state["n"]] = time.time()
                state["n"] += 1

        trig = AnalysisTrigger(TriggerSettings(issuer=self.config.issuer, prefect_api_url=self.config.prefect_api,
                                               prefect_auth_string=self.stack.prefect_auth,
                                               client_secret=DEV_SECRETS["blueapi"], post_on=(),
                                               state_dir=self.tmp / "trig-p2"), token=self.alice())
        appended: dict[int, float] = {}   # Tiled's own time of each raw frame's append
        watchers = [threading.Thread(target=self._watch_live, args=(state, nodes[k], seen[k]), daemon=True)
                    for k in nodes] + [threading.Thread(target=self._watch_appends, args=(state, appended),
                                                        daemon=True)]
        server_cpu0 = self._tiled_cpu()
        t_p2 = time.monotonic()
        for w in watchers:
            w.start()
        # uses_analyses-style metadata, only saxs_average
        self.scan(num, (64, 64), delay, [after_writer, trig], md={"analyses": ["saxs_average"]})
        trig.flush(30)
        fr_id = trig.outbox.requests()[0].flow_run_id
        trig.close()
        self.api.wait_for_flow_run(fr_id, timeout=180)
        for p in probes.values():
            p.communicate(timeout=300)
        time.sleep(1.0)
        state["stop"] = True
        server_cpu, p2_wall = self._tiled_cpu() - server_cpu0, time.monotonic() - t_p2

        def lags(kind):
            got = seen[kind]
            first = min(got.values()) if got else float("inf")
            return ([got[i] - written[i] for i in written if i in got],
                    [got[i] - written[i] for i in written if i in got and written[i] >= first])

        (flow_all, flow_steady), (_, push), (_, poll) = lags("flow"), lags("push"), lags("poll")
        self.rows.append(("P2 live lag, same run (frame written → result readable)",
                          f"poll p50 {pct(poll, 50):.2f}s p95 {pct(poll, 95):.2f}s",
                          f"push p50 {pct(push, 50):.2f}s p95 {pct(push, 95):.2f}s; deployed flow (push) "
                          f"p50 {pct(flow_steady, 50):.2f}s p95 {pct(flow_steady, 95):.2f}s after its start, "
                          f"all frames p50 {pct(flow_all, 50):.2f}s",
                          f"p50 poll/push {pct(poll, 50) / pct(push, 50):.1f}×; "
                          f"{len(seen['push'])}/{len(seen['poll'])}/{len(seen['flow'])} of {num} frames seen"))
        self.details["P2"] = {"push_s": push, "poll_s": poll, "flow_all_s": flow_all, "flow_steady_s": flow_steady,
                              # raw wall-clock times, for a timeline (benchmarks/results/live_lag.md)
                              "written_t": written, "seen_t": seen, "appended_t": appended,
                              "tiled_server_cpu_s": server_cpu, "wall_s": p2_wall}

        def from_append(kind):  # frame appended in Tiled (its timestamp) → result readable
            got = seen[kind]
            first = min(got.values()) if got else float("inf")
            return [got[i] - appended[i] for i in appended if i in got and written.get(i, 0) >= first]

        by_append = {k: from_append(k) for k in nodes}
        self.details["P2"]["from_append_s"] = by_append
        self.rows.append(("P2 lag from Tiled's append of the frame (its stream timestamp) → result readable",
                          f"poll p50 {pct(by_append['poll'], 50):.2f}s p95 {pct(by_append['poll'], 95):.2f}s",
                          "; ".join(f"{k} p50 {pct(v, 50):.2f}s p95 {pct(v, 95):.2f}s"
                                    for k, v in by_append.items() if k != "poll"),
                          f"Tiled server CPU {server_cpu:.1f}s in {p2_wall:.0f}s"))
        if BASELINE:
            (_, push_b), (_, poll_b) = lags("push-base"), lags("poll-base")
            self.rows.append((f"P2 side by side: baseline {BASELINE_REV} (same scan)",
                              f"baseline push p50 {pct(push_b, 50):.2f}s p95 {pct(push_b, 95):.2f}s, "
                              f"poll p50 {pct(poll_b, 50):.2f}s p95 {pct(poll_b, 95):.2f}s",
                              f"this tree push p50 {pct(push, 50):.2f}s p95 {pct(push, 95):.2f}s, "
                              f"poll p50 {pct(poll, 50):.2f}s p95 {pct(poll, 95):.2f}s",
                              f"{len(seen['push-base'])}/{len(seen['poll-base'])} of {num} frames seen (baseline)"))
            self.details["P2"].update(push_base_s=push_b, poll_base_s=poll_b)

    def _tiled_cpu(self) -> float:
        """CPU seconds so far of the Tiled server (its process and children)."""
        import psutil

        try:
            proc = psutil.Process(self.stack.record.services["tiled"]["pid"])
            procs = [proc, *proc.children(recursive=True)]
            return sum(sum(p.cpu_times()[:2]) for p in procs)
        except (KeyError, psutil.Error):
            return float("nan")

    def _watch_appends(self, state, appended):
        """When Tiled appended each raw frame: the timestamp of the ``array-data`` message its
        stream of the raw ``saxs`` node carries (the server's clock, the frame then in Tiled)."""
        import msgpack
        from websockets.sync.client import connect as ws_connect

        from visitflow.flow.push import stream_url

        while state["uid"] is None and not state["stop"]:
            time.sleep(0.05)
        reader = self.root()
        while not state["stop"]:
            try:
                node = reader[f"raw/a1/{state['uid']}/primary/saxs"]
                break
            except KeyError:
                time.sleep(0.02)
        else:
            return
        with ws_connect(stream_url(node.uri) + "?envelope_format=msgpack&start=1", max_size=None) as ws:
            ws.send(json.dumps({"type": "auth", "access_token": self.alice()}))
            while not state["stop"]:
                try:
                    msg = msgpack.unpackb(ws.recv(timeout=0.5))
                except TimeoutError:
                    continue
                except Exception:  # noqa: BLE001 - the producer ended the stream
                    return
                if msg.get("type") in ("array-data", "array-ref"):
                    start = int(((msg.get("patch") or {}).get("offset") or msg.get("offset") or [0])[0])
                    count = int(((msg.get("patch") or {}).get("shape") or msg.get("shape") or [1])[0])
                    when = dt.datetime.fromisoformat(msg["timestamp"]).timestamp()
                    for i in range(start, start + count):
                        appended.setdefault(i, when)

    def _watch_live(self, state, name, seen):
        """When each frame's result became readable: the server-side timestamp of the live
        node's metadata updates, pushed to us by Tiled's stream of the analysis node (no
        polling load on the server being measured)."""
        import msgpack
        from websockets.sync.client import connect as ws_connect

        from visitflow.flow.push import stream_url

        while state["uid"] is None and not state["stop"]:
            time.sleep(0.05)
        reader = self.root()
        path = f"processed/a1/{state['uid']}/{name}"
        while not state["stop"]:
            try:
                node = reader[path]
                break
            except KeyError:
                time.sleep(0.05)
        else:
            return
        with ws_connect(stream_url(node.uri) + "?envelope_format=msgpack&start=1", max_size=None) as ws:
            ws.send(json.dumps({"type": "auth", "access_token": self.alice()}))
            while not state["stop"]:
                try:
                    msg = msgpack.unpackb(ws.recv(timeout=0.5))
                except TimeoutError:
                    continue
                if msg.get("type") == "container-child-metadata-updated" and msg.get("key") == "live":
                    done = int((msg.get("metadata") or {}).get("frames_processed", 0))
                    when = dt.datetime.fromisoformat(msg["timestamp"]).timestamp()
                    for i in range(done):
                        seen.setdefault(i, when)

    # ------------------------------------------------------------------ P3 / P8
    def p3(self):
        from benchmarks import post_read

        row, details = post_read.p3(lambda compression=False: self.root(compression=compression),
                                    lambda num, shape, batch_size: self.scan(num, shape, batch_size=batch_size),
                                    2 if self.quick else 3, self.quick, self.stack.state / "tiled")
        self.rows.append(row)
        self.details["P3"] = details

    def p8(self):
        from benchmarks import post_read

        row, details = post_read.p8(lambda compression=False: self.root(compression=compression),
                                    self.files, 2 if self.quick else 3, self.quick)
        self.rows.append(row)
        self.details["P8"] = details

    # ------------------------------------------------------------------ P4 / P5
    def probe(self, uid, variant, timeout=900, name="saxs_average", repo=REPO):
        out = subprocess.run([sys.executable, str(repo / "benchmarks" / "engine_probe.py"), self.config.tiled_uri,
                              self.alice(), uid, variant, name], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    def p4(self):
        """CPU of the analysis process (reads + compute + writes): live during a scan vs post after it."""
        num = 300 if self.quick else 1000
        state = {}

        def scan():
            self.scan(num, (64, 64), batch_size=10, subscribers=[
                lambda n, d: state.setdefault("uid", d["uid"]) if n == "start" else None])

        t = threading.Thread(target=scan)
        t.start()
        while "uid" not in state:
            time.sleep(0.01)
        results = {}

        def probe(kind, variant):
            results[kind] = self.probe(state["uid"], variant, name=f"saxs_average_{kind.replace('-', '_')}",
                                       repo=BASELINE if kind.endswith("-base") else REPO)

        kinds = (("push", "live-push"), ("poll", "live"),
                 *((("push-base", "live-push"), ("poll-base", "live")) if BASELINE else ()))
        live = [threading.Thread(target=probe, args=a) for a in kinds]
        for p in live:
            p.start()
        for p in live:
            p.join()
        t.join()
        post = self.probe(state["uid"], "post")
        push, poll = results["push"], results["poll"]
        self.rows.append((f"P4 analysis CPU, {num} frames (64×64)", f"post {post['cpu_s']:.2f}s CPU",
                          f"live push {push['cpu_s']:.2f}s CPU, poll {poll['cpu_s']:.2f}s (both during the "
                          f"scan, {push['wall_s']:.0f}s)",
                          f"live/post push {push['cpu_s'] / post['cpu_s']:.1f}×, poll {poll['cpu_s'] / post['cpu_s']:.1f}×"))
        self.details["P4"] = {"live_push": push, "live_poll": poll, "post": post}
        if BASELINE:
            push_b, poll_b = results["push-base"], results["poll-base"]
            self.rows.append((f"P4 side by side: baseline {BASELINE_REV} (same scan, same post)",
                              f"baseline live push {push_b['cpu_s']:.2f}s CPU, poll {poll_b['cpu_s']:.2f}s",
                              f"this tree live push {push['cpu_s']:.2f}s CPU, poll {poll['cpu_s']:.2f}s",
                              f"live/post push {push_b['cpu_s'] / post['cpu_s']:.1f}× → "
                              f"{push['cpu_s'] / post['cpu_s']:.1f}×, poll {poll_b['cpu_s'] / post['cpu_s']:.1f}× → "
                              f"{poll['cpu_s'] / post['cpu_s']:.1f}×"))
            self.details["P4"].update(live_push_base=push_b, live_poll_base=poll_b)

    def p5(self):
        n = 300 if self.quick else 1000
        rss = {}
        for frames in (n, 10 * n):
            t0 = time.monotonic()
            uid = self.scan(frames, (32, 32), batch_size=500)
            log(f"P5: wrote {frames} frames in {time.monotonic() - t0:.0f}s")
            rss[frames] = self.probe(uid, "live")
        a, b = rss[n], rss[10 * n]
        self.rows.append((f"P5 live peak RSS, {n} vs {10 * n} frames (32×32)",
                          f"{a['peak_mb']:.0f} MB (+{a['peak_mb'] - a['base_mb']:.0f} over imports)",
                          f"{b['peak_mb']:.0f} MB (+{b['peak_mb'] - b['base_mb']:.0f} over imports)",
                          f"10n/n {b['peak_mb'] / a['peak_mb']:.2f}× (data is 10×)"))
        self.details["P5"] = rss

    # ------------------------------------------------------------------ P6
    def p6(self):
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tiled_auth.py"), "--n",
                              "100" if self.quick else "200", "--rounds", "2"],
                             capture_output=True, text=True, timeout=900, cwd=REPO)
        if out.returncode != 0:
            self.rows.append(("P6 authorised GET vs API-key GET", "failed", out.stderr[-300:], ""))
            return
        table = [line for line in out.stdout.splitlines() if line.startswith("|")]
        self.details["P6"] = table
        med = {}
        for line in table:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells and cells[0] in ("apikey", "jwt"):
                med[cells[0]] = cells
        if "apikey" in med and "jwt" in med:
            a, j = med["apikey"], med["jwt"]
            self.rows.append(("P6 metadata GET: JWT+policy vs API key", f"api key {a[1]} ms median, {a[4]} req/s",
                              f"jwt {j[1]} ms median, {j[4]} req/s",
                              f"latency ×{float(j[1]) / float(a[1]):.2f}"))
        else:
            self.rows.append(("P6 authorised GET vs API-key GET", "see tiled_auth output", "", ""))

    # ------------------------------------------------------------------ P7
    def p7(self):
        from concurrent.futures import ThreadPoolExecutor

        n = 30 if self.quick else 100
        dep = f"probe/{pstack.POOL}"
        keys = [f"burst-{uuid.uuid4()}" for _ in range(n)]
        t0 = time.time()
        created = {}

        from visitflow.errors import PrefectUnavailable

        retries = [0]

        def create(key):  # as the trigger's outbox does: keep retrying while Prefect sheds load
            while True:
                try:
                    return self.api.create_flow_run(dep, {"seconds": 2.0}, idempotency_key=key)
                except PrefectUnavailable:
                    retries[0] += 1
                    time.sleep(1.0)

        def send(key):  # every trigger request is sent twice (a retried/duplicated trigger)
            a, b = create(key), create(key)
            created[key] = (a["id"], b["id"], time.time())

        with ThreadPoolExecutor(4) as pool:  # several blueapi instances sending at once
            list(pool.map(send, keys))
        ids = {v[0] for v in created.values()}
        dupes = sum(1 for v in created.values() if v[0] != v[1])
        finals = [self.api.wait_for_flow_run(i, timeout=600, interval=0.5) for i in ids]
        completed = sum(1 for f in finals if f["state"]["type"] == "COMPLETED")
        starts = [dt.datetime.fromisoformat(f["start_time"].replace("Z", "+00:00")).timestamp()
                  - dt.datetime.fromisoformat(f["created"].replace("Z", "+00:00")).timestamp() for f in finals
                  if f.get("start_time")]
        total = time.time() - t0
        self.rows.append((f"P7 burst: {n} triggers (each sent twice), 20 concurrent analyses",
                          f"{len(ids)} flow runs, {completed} completed, {dupes} duplicates",
                          f"start p50 {pct(starts, 50):.1f}s p95 {pct(starts, 95):.1f}s",
                          f"all done in {total:.0f}s; {retries[0]} 503/timeouts retried"))
        self.details["P7"] = {"starts_s": starts, "total_s": total}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        mem = "?"
    return f"{platform.node()} · {os.cpu_count()} cores ({cpu}) · {mem} · Python {platform.python_version()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    p.add_argument("--only", default="P1,P2,P3,P4,P5,P6,P7,P8")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--prefect-db", choices=["auto", "sqlite"], default="auto",
                   help="auto: Prefect on a throwaway PostgreSQL when the server is installed "
                        "(VISITFLOW_PREFECT_DATABASE_URL wins if set); sqlite: the dev default")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.prefect_db == "auto" and not os.environ.get("VISITFLOW_PREFECT_DATABASE_URL") \
                and not (set(args.only.upper().split(",")) <= {"P6"}):
            from benchmarks.postgres import throwaway_prefect_database

            url = stack.enter_context(throwaway_prefect_database(log))
            if url:
                os.environ["VISITFLOW_PREFECT_DATABASE_URL"] = url
                log("Prefect runs on a throwaway PostgreSQL")
        elif args.prefect_db == "sqlite":
            os.environ.pop("VISITFLOW_PREFECT_DATABASE_URL", None)
        return _run(args)


def _run(args) -> int:
    from benchmarks.load import LoadWatch

    only = {s.strip().upper() for s in args.only.split(",")}
    t_all = time.monotonic()
    load = LoadWatch()
    with tempfile.TemporaryDirectory(prefix="vf-bench-") as tmp:
        bench = Bench(Path(tmp), args.quick)
        bench.details = {}
        try:
            if only - {"P6"}:
                bench.up()
            for name in ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8"):
                if name in only:
                    t0 = time.monotonic()
                    log(f"{name}...")
                    try:
                        getattr(bench, name.lower())()
                    except Exception as exc:  # noqa: BLE001 - report, keep measuring the rest
                        bench.rows.append((name, "FAILED", f"{type(exc).__name__}: {exc}"[:200], ""))
                    log(f"{name} took {time.monotonic() - t0:.0f}s")
        finally:
            if only - {"P6"}:
                bench.down()
    load.end()
    bench.details["load_average"] = load.as_dict()
    header = ("| measure | baseline | visitflow | ratio |", "|---|---|---|---|")
    lines = [*header, *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in bench.rows)]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    db = os.environ.get("VISITFLOW_PREFECT_DATABASE_URL", "sqlite").split(":", 1)[0]
    text = "\n".join([f"# visitflow benchmarks", "", f"{stamp} · {machine()} · Prefect on {db} · "
                      f"{'quick' if args.quick else 'full'} run, {time.monotonic() - t_all:.0f}s", "", load.note(), "",
                      "Reproduce: `python -m benchmarks` (add `--quick` for a smoke run).", "", *lines, ""])
    print("\n" + load.note() + "\n\n" + "\n".join(lines))
    out = Path(args.out)
    out.write_text(merge_kept(out.read_text() if out.exists() else None, text))
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(bench.details, indent=1, default=str))
    log(f"wrote {args.out} ({time.monotonic() - t_all:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
