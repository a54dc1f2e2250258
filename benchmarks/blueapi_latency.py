"""``python -m benchmarks.blueapi_latency``: start document → flow body running, through the
real blueapi 1.21.1 server vs the in-process trigger, in the same run on the same servers.

Both sides run the same plan (``peak_scan`` from deployments/blueapi/visitflow_example_plans.py)
as Alice, write the run into the same Tiled (blueapi's layout) and trigger ``peak_stats``
through the same Prefect server, warm worker and token service (tests/fixtures/blueapi_stack.py):

* **blueapi**: ``POST /tasks`` + ``PUT /worker/task``; blueapi's TiledWriter and the trigger
  inside blueapi's worker process (hook: visitflow.trigger.blueapi_hook);
* **in-process**: a RunEngine in this process with bluesky-tiled-plugins' TiledWriter and an
  ``AnalysisTrigger`` subscribed (as tests/trigger/test_trigger.py does).

Latency = the live flow run's ``start_time`` (Prefect: entered Running, i.e. the flow body
starts) minus the start document's ``time``; one task at a time, each waited for, the two
sides alternating (so a busy machine slows both alike); the first of each side is a warm-up
and dropped.  Appends a section to benchmarks/RESULTS.md.

``--service-account``: the blueapi side runs in ``tiled.authentication: ServiceAccount`` mode
(a second blueapi on the same stack, tests/fixtures/blueapi_stack.py ``service_account_blueapi``):
the raw run is written by the beamline's service account, the trigger still acts with Alice's
token from the request's pass-through headers.  Its own section in RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deployments" / "blueapi"))

from tests.fixtures import blueapi_stack as bs  # noqa: E402
from visitflow.core.prefect_api import PrefectAPI  # noqa: E402

SECTION = "## blueapi: start document → flow body running (benchmarks/blueapi_latency.py)"
SECTION_SA = ("## blueapi in service-account Tiled mode: start document → flow body running "
              "(benchmarks/blueapi_latency.py --service-account)")


def pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q))


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def wait_runs(api: PrefectAPI, uid: str, n: int = 2, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = api.flow_runs(tags=[f"run:{uid}"])
        if len(runs) >= n:
            return [api.wait_for_flow_run(r["id"], timeout=timeout, interval=0.2) for r in runs]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(runs)} flow runs for {uid} after {timeout}s")
        time.sleep(0.2)


def latency(api: PrefectAPI, root, uid: str) -> float:
    runs = wait_runs(api, uid)
    live = next(r for r in runs if "variant:live" in r["tags"])
    assert all(r["state"]["type"] == "COMPLETED" for r in runs), [r["state"] for r in runs]
    start_doc = root[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{uid}"].metadata["start"]
    return ts(live["start_time"]) - float(start_doc["time"])


class AliceToken:
    """Alice's token, renewed before the dev IdP's 300 s lifetime runs out."""

    def __init__(self, stack):
        self.stack, self.token, self.at = stack, None, 0.0

    def __call__(self) -> str:
        if self.token is None or time.monotonic() - self.at > 120:
            self.token, self.at = self.stack.token("alice"), time.monotonic()
        return self.token


def one_blueapi_task(server, api, root, token, i: int) -> float:
    task = server.run(token(), "peak_scan", {"num": 5, "seed": i})
    assert task["errors"] == [], task
    return latency(api, root, task["outcome"]["result"])


def one_in_process_run(trig, session, api, root, token, i: int) -> float:
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from visitflow_example_plans import peak_scan

    RE = RunEngine({}, context_managers=[], call_returns_result=True)
    RE.subscribe(TiledWriter(session, batch_size=1))
    RE.subscribe(lambda name, doc: trig(name, doc, token=token()))
    uid = RE(peak_scan(num=5, seed=1000 + i), instrument_session=bs.SESSION, instrument=bs.INSTRUMENT).plan_result
    return latency(api, root, uid)


def measure(stack, api, root, token, n: int, tmp: Path, server=None) -> tuple[list[float], list[float]]:
    from visitflow.core.tiled_client import BearerAuth, connect
    from visitflow.trigger import AnalysisTrigger, TriggerSettings

    trig = AnalysisTrigger(TriggerSettings(issuer=stack.idp.issuer, client_secret="blueapi-dev-secret",
                                           prefect_api_url=f"http://127.0.0.1:{stack.proxy.port}/api",
                                           state_dir=tmp / "in-process-trigger", max_backoff=2.0), token=token)
    session = connect(stack.tiled.uri, BearerAuth(token))[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}"]
    blue, local = [], []
    try:
        for i in range(n + 1):
            b = one_blueapi_task(server or stack.blueapi, api, root, token, i)
            p = one_in_process_run(trig, session, api, root, token, i)
            print(f"[bench] {i}: through blueapi {b:.2f}s, in-process {p:.2f}s", flush=True)
            if i:   # the first of each is a warm-up
                blue.append(b)
                local.append(p)
    finally:
        trig.close()
    return blue, local


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=10, help="measured tasks per side (plus one warm-up)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--service-account", action="store_true",
                   help="blueapi writes to Tiled as the beamline's service account (tiled.authentication)")
    args = p.parse_args(argv)
    if not bs.venv_present():
        print("blueapi's venv is missing: run .ci/install-blueapi")
        return 2
    from visitflow.core.tiled_client import BearerAuth, connect

    import contextlib

    with tempfile.TemporaryDirectory() as tmp, bs.running_stack(Path(tmp)) as stack:
        with (stack.service_account_blueapi(Path(tmp) / "blueapi-sa") if args.service_account
              else contextlib.nullcontext(None)) as server:
            api = PrefectAPI(stack.prefect_api, timeout=30)
            token = AliceToken(stack)
            root = connect(stack.tiled.uri, BearerAuth(token))
            blue, local = measure(stack, api, root, token, args.n, Path(tmp), server)
            api.close()
    section = SECTION_SA if args.service_account else SECTION
    mode = "service-account Tiled mode" if args.service_account else "pass-through Tiled mode"
    row = (f"| start doc → flow body running (live), n={args.n} each | "
           f"blueapi p50 {pct(blue, 50):.2f}s / p95 {pct(blue, 95):.2f}s | "
           f"in-process p50 {pct(local, 50):.2f}s / p95 {pct(local, 95):.2f}s | "
           f"{pct(blue, 50) / pct(local, 50):.2f}× (blueapi / in-process, p50) |")
    print(row)
    if not args.no_write:
        import platform

        results = REPO / "benchmarks" / "RESULTS.md"
        text = results.read_text() if results.exists() else ""
        head, _, rest = text.partition("\n" + section)
        tail = rest[rest.find("\n## "):] if rest and "\n## " in rest else ""
        text = head.rstrip("\n") + tail
        text += (f"\n\n{section}\n\n{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                 f"{platform.machine()} · {platform.python_version()}; real blueapi 1.21.1 (`blueapi serve`, own "
                 f"venv, {mode}), dev IdP, Tiled 0.2.20, Prefect server + warm worker, one task at a time.\n\n"
                 f"| metric | through blueapi | in-process trigger | ratio |\n|---|---|---|---|\n{row}\n\n"
                 f"raw (s): blueapi {[round(v, 2) for v in blue]}; in-process {[round(v, 2) for v in local]}\n")
        results.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
