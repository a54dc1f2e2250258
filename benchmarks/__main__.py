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
P9  start document → flow body running through the real blueapi 1.21.1 vs the in-process
    trigger, alternating on one blueapi stack (benchmarks/blueapi_latency.py; needs
    ./.venv-blueapi from .ci/install-blueapi, else the row says how to install it)

Everything runs on loopback against real servers; numbers are ratios measured in the same
run.  Writes ``benchmarks/RESULTS.md`` with the machine, the date and the load average at
the start and end (warned about when above 1: the absolute numbers are then inflated).  ``--quick`` shrinks sizes.
P1, P2 and P7 are measured by benchmarks/measures.py, which ``python -m benchmarks.facility``
(benchmarks/facility.py) also runs on the facility topology (Keycloak, OPA, token service, PostgreSQL).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import measures  # noqa: E402
from benchmarks.measures import pct  # noqa: E402
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


#: Every row, in the order a run measures them (``--only`` picks some).
ROWS = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9")
#: Rows that start their own servers (P6: tiled_auth.py; P9: the blueapi stack), not the local stack.
STANDALONE = {"P6", "P9"}


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
            measures.deploy_probe(self.api, pool)
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
        return measures.scan(self.root(), num, shape, delay, subscribers, batch_size, seed, md)

    def delegate(self, analysis, uid):
        from visitflow.core.scopes import grant_scopes

        grant = oauth.exchange(self.token_url, self.alice(), client_id="blueapi",
                               client_secret=DEV_SECRETS["blueapi"], audience="visitflow",
                               scope=str(grant_scopes(analysis, "a1", uid))).access_token
        self.api.save_secret(grants.grant_secret_name(analysis, "a1", uid), grant)

    def start_latency(self, deployment, n):
        """create flow run → RUNNING (server's start_time), seconds."""
        return measures.start_latency(self.api, deployment, n)

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
        """Start document → flow run created, through the real trigger (measures.trigger_overhead)."""
        from visitflow.trigger import AnalysisTrigger, TriggerSettings

        trig = AnalysisTrigger(TriggerSettings(issuer=self.config.issuer, prefect_api_url=self.config.prefect_api,
                                               prefect_auth_string=self.stack.prefect_auth,
                                               client_secret=DEV_SECRETS["blueapi"], live=True, post_on=(),
                                               state_dir=self.tmp / "trig-p1"), token=self.alice())
        try:
            return measures.trigger_overhead(trig, self.api, n)
        finally:
            trig.close()

    # ------------------------------------------------------------------ P2
    def p2(self):
        from visitflow.trigger import AnalysisTrigger, TriggerSettings

        num, delay = (40, 0.1) if self.quick else (100, 0.1)
        written: dict[int, float] = {}
        nodes = {"flow": "saxs_average", "push": "saxs_average_push", "poll": "saxs_average_poll"}
        seen: dict[str, dict[int, float]] = {k: {} for k in nodes}
        state = {"uid": None, "n": 0, "stop": False}
        probes: dict[str, subprocess.Popen] = {}

        def after_writer(name, doc):  # subscribed after TiledWriter: the frame is in Tiled
            if name == "start":
                state["uid"] = doc["uid"]
                for kind, variant in (("push", "live-push"), ("poll", "live")):
                    probes[kind] = subprocess.Popen(
                        [sys.executable, str(REPO / "benchmarks" / "engine_probe.py"), self.config.tiled_uri,
                         self.alice(), doc["uid"], variant, nodes[kind]], stdout=subprocess.PIPE, text=True)
            elif name == "event":
                written[state["n"]] = time.time()
                state["n"] += 1

        trig = AnalysisTrigger(TriggerSettings(issuer=self.config.issuer, prefect_api_url=self.config.prefect_api,
                                               prefect_auth_string=self.stack.prefect_auth,
                                               client_secret=DEV_SECRETS["blueapi"], post_on=(),
                                               state_dir=self.tmp / "trig-p2"), token=self.alice())
        watchers = [threading.Thread(target=self._watch_live, args=(state, nodes[k], seen[k]), daemon=True)
                    for k in nodes]
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

        (flow_all, flow_steady), (_, push), (_, poll) = (measures.lags(written, seen[k]) for k in ("flow", "push", "poll"))
        self.rows.append(("P2 live lag, same run (frame written → result readable)",
                          f"poll p50 {pct(poll, 50):.2f}s p95 {pct(poll, 95):.2f}s",
                          f"push p50 {pct(push, 50):.2f}s p95 {pct(push, 95):.2f}s; deployed flow (push) "
                          f"p50 {pct(flow_steady, 50):.2f}s p95 {pct(flow_steady, 95):.2f}s after its start, "
                          f"all frames p50 {pct(flow_all, 50):.2f}s",
                          f"p50 poll/push {pct(poll, 50) / pct(push, 50):.1f}×; "
                          f"{len(seen['push'])}/{len(seen['poll'])}/{len(seen['flow'])} of {num} frames seen"))
        self.details["P2"] = {"push_s": push, "poll_s": poll, "flow_all_s": flow_all, "flow_steady_s": flow_steady}

    def _watch_live(self, state, name, seen):
        """measures.watch_live as alice, on this stack's Tiled."""
        measures.watch_live(state, name, seen, self.root, self.alice)

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
    def probe(self, uid, variant, timeout=900, name="saxs_average"):
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "engine_probe.py"), self.config.tiled_uri,
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
            results[kind] = self.probe(state["uid"], variant, name=f"saxs_average_{kind}")

        live = [threading.Thread(target=probe, args=a) for a in (("push", "live-push"), ("poll", "live"))]
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
        n = 30 if self.quick else 100
        result = measures.burst(self.api, f"probe/{pstack.POOL}", n)
        self.rows.append(measures.burst_cells(n, result))
        self.details["P7"] = {k: v for k, v in result.items() if k != "ids"}

    # ------------------------------------------------------------------ P9
    def p9(self):
        """Through blueapi: its own stack (blueapi's IdP users, Tiled layout, Prefect + warm
        worker), Prefect on its own database of this run's PostgreSQL (SQLite if the run is on
        SQLite), so P9 is measured on the same kind of Prefect as P1."""
        from benchmarks import blueapi_latency as bl

        if not bl.bs.venv_present():
            self.rows.append(bl.p9_missing_row())
            self.details["P9"] = {"not_run": bl.INSTALL_HINT}
            return
        url = os.environ.get("VISITFLOW_PREFECT_DATABASE_URL")
        if url and url.startswith("postgresql"):
            from benchmarks.postgres import sibling_database

            url = sibling_database(url, f"prefect_p9_{os.getpid()}")
        else:
            url = None
        n = 5 if self.quick else 10
        blue, local, timelines = bl.run(n, self.tmp / "p9", url)
        self.rows.append(bl.p9_cells(n, blue, local, url.split(":", 1)[0] if url else "sqlite", timelines))
        self.details["P9"] = {"blueapi_s": blue, "in_process_s": local, "timelines": timelines}

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
    p.add_argument("--only", default=",".join(ROWS))
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
            if only - STANDALONE:
                bench.up()
            for name in ROWS:
                if name in only:
                    t0 = time.monotonic()
                    log(f"{name}...")
                    try:
                        getattr(bench, name.lower())()
                    except Exception as exc:  # noqa: BLE001 - report, keep measuring the rest
                        bench.rows.append((name, "FAILED", f"{type(exc).__name__}: {exc}"[:200], ""))
                    log(f"{name} took {time.monotonic() - t0:.0f}s")
        finally:
            if only - STANDALONE:
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
