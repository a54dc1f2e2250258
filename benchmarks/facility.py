"""``python -m benchmarks.facility``: P1, P2 and P7 on the facility topology, beside the local stack.

The facility topology (benchmarks/facility_topology.py): Keycloak's realm ``facility`` as the IdP
(production mode: PostgreSQL, TLS only; ``--idp dev`` for the facility story's dev-mode
Keycloak), OPA deciding every exchange, the token service in production mode with its state in
PostgreSQL, Tiled with the facility policy, Prefect on PostgreSQL with the warm worker; with the
production IdP every hop of it is TLS from one CA made for the run (PostgreSQL's too, verify-full),
with ``--idp dev`` none is.  Then,
unless ``--no-local``, the local stack of ``python -m benchmarks`` (dev IdP, Prefect on its own
throwaway PostgreSQL) measured by the same code (benchmarks/measures.py).  Both stay up and the
rows are interleaved, the side measured first alternating row by row: on a shared machine the
load changes during a run, and two topologies measured one after the other would compare loads.

P1  start document → flow body running = p50 (p95) of start document → flow run created through
    the real trigger (at the facility: alice's Keycloak token exchanged at the token service,
    which asks OPA; the grant saved as a Prefect Secret; the run created) + p50 (p95) of
    create → RUNNING (server's start_time) of a do-nothing flow on the warm worker;
P2  live lag of the deployed live ``saxs_average`` on a real scan (RunEngine + TiledWriter as
    alice, 64×64 frames at 10 Hz): frame written → its result readable (the server's timestamp
    of the live node's update, pushed by Tiled's stream), p50/p95 for frames written after the
    analysis' first result, and p50 of all frames;
P7  100 triggers each sent twice under one idempotency key by 4 senders at once, for a 2-s flow
    on a pool limited to 20 concurrent runs: runs / completed / duplicates, created → RUNNING
    p50/p95, makespan (first create → last end) against the ideal 100·2/20 = 10 s.

Records the load average at the start and end (warns above 1) and which hops are TLS.  Writes
``benchmarks/results/facility.md`` (and ``.json`` with every sample); ``--quick`` shrinks sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import measures  # noqa: E402
from benchmarks.measures import pct  # noqa: E402
from visitflow.stack.prefect import POOL  # noqa: E402

__all__ = ["Sizes", "sizes", "parse_args", "p1_cell", "p2_cell", "p7_cell", "ideal_makespan", "table", "order", "main"]

PROBE = f"probe/{POOL}"   # measures.deploy_probe's deployment on the warm worker's pool
ROWS = ("P1", "P2", "P7")


def log(msg):
    print(f"[bench-facility] {msg}", flush=True)


# ------------------------------------------------------------------ pure parts
@dataclass(frozen=True)
class Sizes:
    """How many samples each row takes.  P7's concurrency is the pool's limit, which both
    topologies set to 20 (``prefect work-pool set-concurrency-limit``)."""

    p1_starts: int          # create → running, one run after another
    p1_triggers: int        # start document → created, through the trigger (after one warm-up)
    p2_frames: int
    p2_delay: float         # seconds between frames
    p7_triggers: int
    p7_seconds: float = 2.0
    p7_concurrency: int = 20


def sizes(quick: bool) -> Sizes:
    """``python -m benchmarks``' sizes for P2 and P7; P1 takes 10 trigger samples (not 5) for a p95."""
    if quick:
        return Sizes(p1_starts=5, p1_triggers=3, p2_frames=40, p2_delay=0.1, p7_triggers=30)
    return Sizes(p1_starts=10, p1_triggers=10, p2_frames=100, p2_delay=0.1, p7_triggers=100)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.facility", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    p.add_argument("--only", default=",".join(ROWS), help="rows to measure, of P1,P2,P7")
    p.add_argument("--idp", choices=("production", "dev"), default="production",
                   help="production: Keycloak start --optimized, TLS, PostgreSQL; dev: the facility story's "
                        "dev-mode Keycloak (plain HTTP)")
    p.add_argument("--no-local", dest="local", action="store_false",
                   help="skip the local stack (the facility column only)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "facility.md"))
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    unknown = args.only - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}: choose from {','.join(ROWS)}")
    return args


def ideal_makespan(n: int, seconds: float, concurrency: int) -> float:
    """The burst's lower bound: n runs of ``seconds`` each, ``concurrency`` at a time."""
    return -(-n // concurrency) * seconds


def p1_cell(d: dict | None) -> str:
    if not d:
        return "—"
    trig, start = d["startdoc_to_created_s"], d["create_to_running_s"]
    return (f"{pct(trig, 50) + pct(start, 50):.2f}s / p95 {pct(trig, 95) + pct(start, 95):.2f}s "
            f"(trigger p50 {pct(trig, 50):.2f}s p95 {pct(trig, 95):.2f}s + create → running p50 "
            f"{pct(start, 50):.2f}s p95 {pct(start, 95):.2f}s)")


def p2_cell(d: dict | None) -> str:
    if not d:
        return "—"
    steady, every = d["flow_steady_s"], d["flow_all_s"]
    return (f"p50 {pct(steady, 50):.2f}s p95 {pct(steady, 95):.2f}s after its start; all frames p50 "
            f"{pct(every, 50):.2f}s; {d['frames_seen']}/{d['frames']} frames seen, run {d['final']}")


def p7_cell(d: dict | None, s: Sizes) -> str:
    if not d:
        return "—"
    ideal = ideal_makespan(s.p7_triggers, s.p7_seconds, s.p7_concurrency)
    return (f"{d['runs']} runs, {d['completed']} completed, {d['duplicates']} duplicates; start p50 "
            f"{pct(d['starts_s'], 50):.1f}s p95 {pct(d['starts_s'], 95):.1f}s; makespan {d['makespan_s']:.1f}s "
            f"= {d['makespan_s'] / ideal:.1f}× ideal ({ideal:.0f}s); all seen done in {d['total_s']:.0f}s; "
            f"{d['retries']} 503/timeouts retried")


def _ratio(local: dict | None, facility: dict | None, value) -> str:
    try:
        a, b = value(local), value(facility)
    except (KeyError, TypeError):
        return "—"
    return f"{b / a:.2f}×" if a else "—"


def table(results: dict, s: Sizes, only=ROWS) -> list[str]:
    """The results table: one row per measure, local stack | facility | facility/local (p50)."""
    loc, fac = results.get("local", {}), results.get("facility", {})

    def p1_p50(d):
        return pct(d["startdoc_to_created_s"], 50) + pct(d["create_to_running_s"], 50)

    rows = [("P1 start doc → flow body running (p50 / p95)", p1_cell(loc.get("P1")), p1_cell(fac.get("P1")),
             _ratio(loc.get("P1"), fac.get("P1"), p1_p50)),
            (f"P2 live lag, deployed live flow, {s.p2_frames} frames 64×64 at {1 / s.p2_delay:.0f} Hz",
             p2_cell(loc.get("P2")), p2_cell(fac.get("P2")),
             _ratio(loc.get("P2"), fac.get("P2"), lambda d: pct(d["flow_steady_s"], 50))),
            (f"P7 burst: {s.p7_triggers} triggers (each sent twice), {s.p7_concurrency} concurrent × "
             f"{s.p7_seconds:g} s", p7_cell(loc.get("P7"), s), p7_cell(fac.get("P7"), s),
             _ratio(loc.get("P7"), fac.get("P7"), lambda d: d["makespan_s"]) + " makespan")]
    out = ["| measure | local stack (dev IdP) | facility topology | facility / local (p50) |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows if a[:2] in only]
    return out


# ------------------------------------------------------------------ measuring (any topology)
def measure_p1(topo, tmp: Path, s: Sizes) -> dict:
    start = measures.start_latency(topo.api, PROBE, s.p1_starts)
    trig = topo.trigger(tmp / "trig-p1", live=True, post_on=())
    try:
        overhead = measures.trigger_overhead(trig, topo.api, s.p1_triggers)
    finally:
        trig.close()
    return {"create_to_running_s": start, "startdoc_to_created_s": overhead}


def measure_p2(topo, tmp: Path, s: Sizes) -> dict:
    written: dict[int, float] = {}
    seen: dict[int, float] = {}
    state = {"uid": None, "n": 0, "stop": False}

    def after_writer(name, doc):  # subscribed after TiledWriter: the frame is in Tiled
        if name == "start":
            state["uid"] = doc["uid"]
        elif name == "event":
            written[state["n"]] = time.time()
            state["n"] += 1

    trig = topo.trigger(tmp / "trig-p2", post_on=())
    watcher = threading.Thread(target=measures.watch_live, args=(state, "saxs_average", seen, topo.root, topo.alice),
                               kwargs={"header_auth": True}, daemon=True)
    watcher.start()
    try:
        measures.scan(topo.root(), s.p2_frames, (64, 64), s.p2_delay, [after_writer, trig],
                      md={"analyses": ["saxs_average"]})
        trig.flush(30)
        fr_id = trig.outbox.requests()[0].flow_run_id
    finally:
        trig.close()
    final = topo.api.wait_for_flow_run(fr_id, timeout=180)
    time.sleep(1.0)
    state["stop"] = True
    watcher.join(10)
    every, steady = measures.lags(written, seen)
    return {"flow_all_s": every, "flow_steady_s": steady, "frames": s.p2_frames, "frames_seen": len(seen),
            "final": final["state"]["type"]}


def measure_p7(topo, s: Sizes) -> dict:
    r = measures.burst(topo.api, PROBE, s.p7_triggers, seconds=s.p7_seconds)
    return {"runs": len(r.pop("ids")), **r}


MEASURES = {"P1": lambda topo, tmp, s: measure_p1(topo, tmp, s), "P2": lambda topo, tmp, s: measure_p2(topo, tmp, s),
            "P7": lambda topo, tmp, s: measure_p7(topo, s)}


def order(sides: list[str], row: str) -> list[str]:
    """Which topology measures a row first: alternating from row to row, so a load that
    grows or shrinks during the run does not always favour the same side."""
    return sides if ROWS.index(row) % 2 == 0 else sides[::-1]


def measure_rows(topos: dict, tmp: Path, only: set[str], s: Sizes, results: dict) -> None:
    """Every row on every topology that is up, interleaved row by row (both stay up)."""
    for name in ROWS:
        if name not in only:
            continue
        for side in order(list(topos), name):
            t0 = time.monotonic()
            log(f"{side} {name}... (load {os.getloadavg()[0]:.2f})")
            try:
                results[side][name] = MEASURES[name](topos[side], tmp / side, s)
            except Exception as exc:  # noqa: BLE001 - report, keep measuring the rest
                results[side][name] = None
                results[side].setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"[:300]
                log(f"{side} {name} FAILED: {exc}")
            log(f"{side} {name} took {time.monotonic() - t0:.0f}s; load {os.getloadavg()[0]:.2f}")


class LocalTopology:
    """The local stack of ``python -m benchmarks`` (its Bench), seen as measure_* want a topology."""

    def __init__(self, bench):
        self.bench, self.api, self.root, self.alice = bench, bench.api, bench.root, bench.alice

    def trigger(self, state_dir: Path, **settings):
        from visitflow.stack.local import DEV_SECRETS
        from visitflow.trigger import AnalysisTrigger, TriggerSettings

        c = self.bench.config
        return AnalysisTrigger(TriggerSettings(issuer=c.issuer, prefect_api_url=c.prefect_api,
                                               prefect_auth_string=self.bench.stack.prefect_auth,
                                               client_secret=DEV_SECRETS["blueapi"], state_dir=state_dir,
                                               **settings), token=self.bench.alice())


@contextlib.contextmanager
def local_topology(quick: bool, tmp: Path, info: dict):
    """``python -m benchmarks``' stack (Prefect on its own throwaway PostgreSQL, as there)."""
    from benchmarks.__main__ import Bench
    from benchmarks.postgres import throwaway_prefect_database

    saved = os.environ.get("VISITFLOW_PREFECT_DATABASE_URL")
    with throwaway_prefect_database(log) as url:
        if url:
            os.environ["VISITFLOW_PREFECT_DATABASE_URL"] = url
        info["prefect_db"] = "postgresql" if url else "sqlite"
        try:
            bench = Bench(tmp / "local", quick)
            try:
                bench.up()
                yield LocalTopology(bench)
            finally:
                bench.down()
        finally:
            if saved is None:
                os.environ.pop("VISITFLOW_PREFECT_DATABASE_URL", None)
            else:
                os.environ["VISITFLOW_PREFECT_DATABASE_URL"] = saved


def bring_up(stack: contextlib.ExitStack, args, tmp: Path, results: dict) -> dict:
    """Start the facility topology, then (unless ``--no-local``) the local stack; both stay up.
    A side that fails to start is recorded as failed and left out."""
    from benchmarks.facility_topology import facility_topology

    sides = {"facility": lambda info: facility_topology(tmp / "facility", args.idp, log, info)}
    if args.local:
        sides["local"] = lambda info: local_topology(args.quick, tmp, info)
    topos = {}
    for side, make in sides.items():
        results[side] = {}
        t0 = time.monotonic()
        try:
            topos[side] = stack.enter_context(make(results[side]))
        except Exception as exc:  # noqa: BLE001 - the other side may still be worth having
            results[side]["failed"] = {"up": f"{type(exc).__name__}: {exc}"[:500]}
            log(f"{side} FAILED to start: {exc}")
            continue
        results[side]["up_s"] = time.monotonic() - t0
        log(f"{side} up in {results[side]['up_s']:.0f}s; load {os.getloadavg()[0]:.2f}")
    return topos


def _local_sentence(results: dict) -> str:
    if "local" not in results:
        return "Local stack: not measured in this run (`--no-local`)."
    return ("Local: `python -m benchmarks`'s stack (dev IdP, Tiled on SQLite, Prefect on a throwaway "
            f"{results['local'].get('prefect_db', '?')} database), by the same code (benchmarks/measures.py). Both "
            "were up at once; each row was measured on one side then the other (P1 and P7 facility first, "
            "P2 local first).")


def _tls_sentence(idp: str) -> str:
    if idp == "dev":
        return ("`--idp dev` is the facility story's topology unchanged: every hop is plain (HTTP, and plain TCP "
                "to PostgreSQL), Keycloak's dev mode included.")
    return ("Every hop is TLS, from one CA made for the run (benchmarks/facility_topology.py): a certificate per "
            "server (Keycloak, PostgreSQL, OPA, the token service, Tiled, Prefect's API), every client verifying "
            "against that CA only (`SSL_CERT_FILE`, `PREFECT_API_SSL_CERT_FILE`; PostgreSQL `sslmode=verify-full`, "
            "whose server refuses TCP logins without TLS), as the shipped facility overlay names every service "
            "with https (deployments/kubernetes/overlays/facility/site.env). The local column is plain HTTP "
            "throughout.")


def _db_tls_sentence(results: dict) -> str:
    seen = (results.get("facility") or {}).get("database_tls")
    if not seen:
        return ""
    return (" PostgreSQL's own count of its TCP sessions (`pg_stat_ssl`): "
            f"{seen.get('up', '?')} once the topology was up, {seen.get('end', '?')} before it was stopped.")


def report(args, s: Sizes, results: dict, load, took: float) -> str:
    from benchmarks.__main__ import machine
    from benchmarks.facility_topology import hops

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hop_rows = ["| hop | parties | transport |", "|---|---|---|",
                *(f"| {a} | {b} | {c} |" for a, b, c in hops(args.idp))]
    failed = {f"{side} {k}": v for side in ("facility", "local") for k, v in
              (results.get(side, {}).get("failed") or {}).items()}
    idp = ("Keycloak 26.7.3 `start --optimized` (production mode: PostgreSQL, TLS only), "
           "realm-facility.json as shipped + benchmark overlay (user alice, a password-grant client)"
           if args.idp == "production" else
           "Keycloak 26.7.3 dev mode (plain HTTP), realm facility with the dev overlay (the facility story's)")
    return "\n".join([
        "# P1, P2, P7 on the facility topology, beside the local stack", "",
        f"{stamp} · {machine()} · {'quick' if args.quick else 'full'} run, {took:.0f}s", "",
        load.note(), "",
        f"Facility: {idp}; OPA v1.22.3 deciding every exchange (deployments/opa/); the token service in "
        "production mode (deployments/token-service.yaml, state in PostgreSQL); Tiled with the facility "
        "policy (users' tokens from the IdP decided by OPA, cached 2 s; catalog, tables and principals "
        "in PostgreSQL); Prefect server on PostgreSQL (auth string) + the warm `visitflow` worker. "
        + _local_sentence(results),
        "", "Which hops are TLS in the facility topology (everything is on loopback):", "", *hop_rows, "",
        _tls_sentence(args.idp) + _db_tls_sentence(results), "",
        *table(results, s, args.only), "",
        *([f"Failed: {failed}", ""] if failed else []),
        "Definitions: see the docstring of benchmarks/facility.py (P1 is the sum of the trigger's and the "
        "start's p50s, as in `python -m benchmarks`; P7's makespan is first create → last run's end_time).",
        "", f"This run: `python -m benchmarks.facility{''.join(' ' + a for a in args.argv)}`.", "",
        "Reproduce: `python -m benchmarks.facility` (`--quick` for a smoke run, `--idp dev` for the "
        "facility story's dev-mode Keycloak, `--no-local` for the facility column only). Needs the "
        "PostgreSQL server (deployments/postgres/start-local.sh), OPA (deployments/opa/install.sh) and "
        "Keycloak (deployments/keycloak/fetch.sh, build-production.sh).", ""])


def main(argv=None) -> int:
    from benchmarks.load import LoadWatch

    args = parse_args(argv)
    s = sizes(args.quick)
    load = LoadWatch()
    t_all = time.monotonic()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="vf-bench-facility-") as tmp, contextlib.ExitStack() as stack:
        topos = bring_up(stack, args, Path(tmp), results)
        measure_rows(topos, Path(tmp), args.only, s, results)
        log("stopping...")
    load.end()
    results["load_average"] = load.as_dict()
    text = report(args, s, results, load, time.monotonic() - t_all)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"idp": args.idp, "quick": args.quick, "sizes": asdict(s), **results},
                                                   indent=1, default=str))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
