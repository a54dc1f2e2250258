"""P3 and P8: post read throughput against the ceiling of the same array read from its storage.

P3  a scan written by TiledWriter (400×256² float32, batches of 50 frames → zarr chunks of
    50 frames): naive ``arr[:]`` (the stock client with compression) vs ours
    (:class:`~visitflow.flow.source.TiledRawRun`) vs the best plain-tiled path, and the
    ceiling: the same zarr array opened straight from Tiled's data directory on this machine.
P8  a registered HDF5 detector file (the path real detectors take: the detector writes the
    file, TiledWriter registers it from StreamResource/StreamDatum documents): naive vs ours
    vs the ceiling (h5py reading the file directly).

Every variant is run in interleaved rounds (so load from other work hits them alike) and each
result is checked equal to the first.  ``python -m benchmarks.post_read`` runs both on their
own (a dev IdP and a Tiled server only, no Prefect) and prints the rows; ``python -m
benchmarks`` calls the same functions on its stack.  The ceiling reads through the page cache
(the array was just written), as do the server's reads: the comparison is like for like.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg):
    print(f"[bench] {msg}", flush=True)


def _rounds(variants: dict, rounds: int) -> tuple[dict[str, float], dict, float]:
    """MB/s (median over interleaved rounds) of each variant, their times and the array's MB;
    all variants must return equal arrays."""
    times = {k: [] for k in variants}
    ref = None
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            data = fn()
            times[name].append(time.perf_counter() - t)
            if ref is None:
                ref = data
            assert data.shape == ref.shape and np.array_equal(data, ref), name
            del data
    mb = ref.nbytes / 1e6
    return {k: mb / statistics.median(v) for k, v in times.items()}, times, mb


def zarr_storage_path(data_dir: Path, arr) -> Path:
    """The zarr directory Tiled wrote this array to (its data source's asset)."""
    from visitflow.tiled.file_roots import file_path

    (source,) = arr.data_sources()
    uri = source.assets[0].data_uri
    path = file_path(uri)
    if path is None or not Path(path).exists():
        raise RuntimeError(f"array storage {uri!r} is not a local path under {data_dir}")
    return Path(path)


def ceiling_zarr(path: Path):
    import zarr

    def read():
        return zarr.open_array(str(path), mode="r")[:]
    return read


def ceiling_h5(path: Path, dataset: str):
    import h5py

    def read():
        with h5py.File(path, "r") as f:
            return f[dataset][:]
    return read


def p3(root, scan, rounds: int, quick: bool, data_dir: Path | None):
    """Rows for P3: ``root(compression=...)`` gives a client, ``scan(num, shape, batch_size)`` a uid."""
    from visitflow.flow.source import TiledRawRun

    num, shape = (100, (256, 256)) if quick else (400, (256, 256))
    t0 = time.monotonic()
    uid = scan(num, shape, 50)
    log(f"P3: wrote {num} frames of {shape} in {time.monotonic() - t0:.0f}s")
    path = f"raw/a1/{uid}/primary/saxs"

    def naive():
        return root(compression=True)[path][:]

    def best_plain():  # identity encoding, 8 MB frame-aligned pieces, 4 parallel requests
        arr = root()[path]
        step = max(1, (8 << 20) // (int(np.prod(shape)) * np.dtype(arr.dtype).itemsize))
        with ThreadPoolExecutor(4) as pool:
            parts = list(pool.map(lambda a: arr[a:a + step], range(0, num, step)))
        return np.concatenate(parts)

    def ours():
        src = TiledRawRun(root()[f"raw/a1/{uid}"], ("saxs",))
        return src.read(0, src.status().frames)["saxs"]

    variants = {"naive": naive, "ours": ours, "best": best_plain}
    if data_dir is not None:
        variants["ceiling"] = ceiling_zarr(zarr_storage_path(data_dir, root()[path]))
    thr, times, mb = _rounds(variants, rounds)
    ceil = thr.get("ceiling")
    dtype = np.dtype(root()[path].dtype)
    row = ("P3 post read throughput, "
           f"{num}×{shape[0]}² {dtype.name} as TiledWriter stores it ({mb:.0f} MB, zarr, 50-frame chunks)",
           f"naive [:] {thr['naive']:.0f} MB/s; ceiling (zarr from disk) "
           + (f"{ceil:.0f} MB/s" if ceil else "n/a"),
           f"ours {thr['ours']:.0f} MB/s; best plain-tiled {thr['best']:.0f} MB/s",
           f"ours/naive {thr['ours'] / thr['naive']:.1f}×, ours/best {thr['ours'] / thr['best']:.2f}×"
           + (f", ceiling/ours {ceil / thr['ours']:.1f}×" if ceil else ""))
    return row, {"MB": mb, "seconds": times, "MB_s": thr}


# -------------------------------------------------------------------- P8: HDF5 detector file
def detector_file_docs(h5: Path, num: int, shape: tuple[int, int], dtype="<u4", seed=0):
    """Write an HDF5 detector file as a detector would (frame-chunked, one frame per chunk),
    then yield the documents of the scan that registers it: one StreamResource naming the
    file, one StreamDatum per frame (written whole first: the benchmark reads it post)."""
    import h5py
    from event_model import compose_run

    rng = np.random.default_rng(seed)
    with h5py.File(h5, "w", libver="latest") as f:
        ds = f.create_dataset("/entry/data", shape=(num, *shape), dtype=dtype, chunks=(1, *shape))
        for i in range(num):  # detector counts: Poisson-ish, incompressible-ish
            ds[i] = rng.integers(0, 1 << 16, size=shape, dtype=dtype)
    run = compose_run(metadata={"plan_name": "count", "instrument_session": "a1"})
    yield "start", run.start_doc
    desc = run.compose_descriptor(name="primary", data_keys={
        "saxs": {"source": "sim:det", "dtype": "array", "dtype_numpy": np.dtype(dtype).str, "shape": list(shape),
                 "external": "STREAM:"},
        "motor": {"source": "sim:motor", "dtype": "number", "dtype_numpy": "<f8", "shape": []}})
    yield "descriptor", desc.descriptor_doc
    res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=h5.as_uri(), data_key="saxs",
                                      parameters={"dataset": "/entry/data", "chunk_shape": [1, *shape]})
    yield "stream_resource", res.stream_resource_doc
    for i in range(num):
        yield "stream_datum", res.compose_stream_datum(indices={"start": i, "stop": i + 1},
                                                       seq_nums={"start": i + 1, "stop": i + 2},
                                                       descriptor=desc.descriptor_doc)
        yield "event", desc.compose_event(data={"motor": float(i)}, timestamps={"motor": 0.0}, seq_num=i + 1)
    yield "stop", run.compose_stop(exit_status="success")


def p8(root, file_dir: Path, rounds: int, quick: bool):
    from bluesky_tiled_plugins import TiledWriter

    from visitflow.flow.source import TiledRawRun

    num, shape = (50, (1024, 1024)) if quick else (200, (1024, 1024))
    h5 = file_dir / "a1" / "det_000.h5"
    h5.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    writer = TiledWriter(root()["raw"]["a1"], batch_size=50)
    uid = None
    for name, doc in detector_file_docs(h5, num, shape):
        uid = doc["uid"] if name == "start" else uid
        writer(name, doc)
    mb = num * int(np.prod(shape)) * 4 / 1e6
    log(f"P8: wrote and registered {num} frames of {shape} uint32 ({mb:.0f} MB) in {time.monotonic() - t0:.0f}s")
    path = f"raw/a1/{uid}/primary/saxs"

    def naive():
        return root(compression=True)[path][:]

    def ours():
        src = TiledRawRun(root()[f"raw/a1/{uid}"], ("saxs",))
        return src.read(0, src.status().frames)["saxs"]

    thr, times, mb = _rounds({"naive": naive, "ours": ours, "ceiling": ceiling_h5(h5, "/entry/data")}, rounds)
    row = (f"P8 registered HDF5 detector file, {num}×1024² uint32 ({mb:.0f} MB, 1-frame chunks)",
           f"naive [:] {thr['naive']:.0f} MB/s; ceiling (h5py from disk) {thr['ceiling']:.0f} MB/s",
           f"ours {thr['ours']:.0f} MB/s",
           f"ours/naive {thr['ours'] / thr['naive']:.1f}×, ceiling/ours {thr['ceiling'] / thr['ours']:.1f}×")
    return row, {"MB": mb, "seconds": times, "MB_s": thr}


# -------------------------------------------------------------------- stand-alone
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.post_read", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="P3,P8")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    only = {s.strip().upper() for s in args.only.split(",")}

    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from benchmarks.load import LoadWatch
    from tests.fixtures.tiled_fixtures import running_tiled
    from tests.fixtures.idp_fixtures import start_idp
    from visitflow.core.tiled_client import BearerAuth, connect
    from visitflow.stack.sim import make_devices, motor_scan

    load = LoadWatch()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vf-postread-", dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        files = tmp / "beamline"
        (files / "a1").mkdir(parents=True)
        idp = start_idp(tmp / "idp")
        try:
            with running_tiled(idp, tmp / "tiled", extra_args=("--file-root", f"raw={files}/{{visit}}")) as tiled:
                def root(compression=False):
                    return connect(tiled.uri, BearerAuth(lambda: idp.token("alice")), compression=compression)

                def scan(num, shape, batch_size):
                    motor, det, saxs = make_devices(shape, seed=0)
                    RE = RunEngine({}, context_managers=[])
                    RE.subscribe(TiledWriter(root()["raw"]["a1"], batch_size=batch_size))
                    (uid,) = RE(motor_scan([det, saxs], motor, num, md={"instrument_session": "a1"}))
                    return uid

                if "P3" in only:
                    rows.append(p3(root, scan, args.rounds, args.quick, tiled.state_dir)[0])
                if "P8" in only:
                    rows.append(p8(root, files, args.rounds, args.quick)[0])
        finally:
            idp.service.stop()
    load.end()
    print("\n".join([load.note(), "", "| measure | baseline | visitflow | ratio |", "|---|---|---|---|",
                     *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
