"""TiledRawRun's fast read path (parallel, chunk-aligned, streamed into one array) against a
real Tiled server: the frames are exactly the stock client's and the writer's, however the
range is cut; a prefetched block sequence equals the plain reads; and what it asks the
server for is what benchmarks/post_read.py measured (octet-stream, identity, whole chunks).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.scans import user_root
from visitflow.flow.source import RAW_HEADERS, TiledRawRun, request_frames

SHAPE = (12, 10)


# ------------------------------------------------------------------ pure logic
@pytest.mark.parametrize("frame_bytes,chunk_bytes,stored,want", [
    (1000, 10_000, None, 10),      # no storage chunking known: about chunk_bytes
    (1000, 10_000, 4, 8),          # rounded down to whole storage chunks
    (1000, 10_000, 50, 50),        # a chunk bigger than chunk_bytes: one whole chunk
    (1000, 500, None, 1),          # a frame bigger than chunk_bytes: one frame
    (1000, 10_000, 10, 10),
])
def test_request_frames_covers_whole_storage_chunks(frame_bytes, chunk_bytes, stored, want):
    assert request_frames(frame_bytes, chunk_bytes, stored) == want


def test_raw_headers_ask_for_uncompressed_bytes():
    assert RAW_HEADERS == {"Accept": "application/octet-stream", "Accept-Encoding": "identity"}


# ------------------------------------------------------------------ real server
@pytest.fixture(scope="module")
def scan(idp, tiled_server):
    """23 frames written 4 at a time (zarr chunks of 4 frames), float64 as TiledWriter stores them."""
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from visitflow.stack.sim import make_devices, motor_scan

    alice = idp.token("alice")
    motor, det, saxs = make_devices(SHAPE, seed=7)
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(TiledWriter(user_root(tiled_server.uri, alice)["raw"]["a1"], batch_size=4))
    (uid,) = RE(motor_scan([det, saxs], motor, 23, md={"instrument_session": "a1"}))
    run = user_root(tiled_server.uri, alice)[f"raw/a1/{uid}"]
    stock = np.asarray(run["primary"]["saxs"].read())
    assert stock.shape == (23, *SHAPE)
    return run, stock


@pytest.mark.parametrize("chunk_bytes,workers", [(1, 4), (8 * 12 * 10 * 8, 3), (1 << 30, 4), (1, 1)])
@pytest.mark.parametrize("start,stop", [(0, 23), (3, 21), (5, 6), (22, 23)])
def test_any_cut_reads_the_stock_clients_frames(scan, chunk_bytes, workers, start, stop):
    run, stock = scan
    src = TiledRawRun(run, ("saxs", "motor"), read_workers=workers, chunk_bytes=chunk_bytes)
    assert src.status().frames == 23
    got = src.read(start, stop)
    assert got["saxs"].dtype == stock.dtype and got["saxs"].flags.c_contiguous
    np.testing.assert_array_equal(got["saxs"], stock[start:stop])
    np.testing.assert_array_equal(got["motor"], np.asarray(run["primary"]["motor"].read())[start:stop])


def test_prefetched_blocks_equal_plain_reads(scan):
    run, stock = scan
    src = TiledRawRun(run, ("saxs",), chunk_bytes=1)
    blocks = list(src.blocks(2, 23, 5))
    assert [len(b["saxs"]) for b in blocks] == [5, 5, 5, 5, 1]
    np.testing.assert_array_equal(np.concatenate([b["saxs"] for b in blocks]), stock[2:23])


def test_requests_are_chunk_aligned_octet_stream(scan):
    """The requests the read makes: whole 4-frame chunks, uncompressed octet-stream."""
    run, stock = scan
    src = TiledRawRun(run, ("saxs",), read_workers=2, chunk_bytes=1)
    src.status()
    client = src._fields["saxs"].context.http_client
    seen = []

    def record(request):
        if "/array/full/" in request.url.path:
            seen.append((request.url.params.get("slice"), request.headers.get("accept"),
                         request.headers.get("accept-encoding")))

    client.event_hooks["request"].append(record)
    try:
        np.testing.assert_array_equal(src.read(0, 23)["saxs"], stock)
    finally:
        client.event_hooks["request"].remove(record)
    assert sorted(seen) == sorted((f"{a}:{min(a + 4, 23)}", "application/octet-stream", "identity")
                                  for a in range(0, 23, 4))


def test_a_token_that_may_not_read_is_refused_not_garbled(idp, tiled_server, scan):
    """The data request carries the node's own auth: alice's array node re-bound to bob's
    client (visit a2 only) is refused by the server (a 4xx raised), never read or faked."""
    from tiled.client.utils import ClientError

    run, _ = scan
    src = TiledRawRun(run, ("saxs",))
    src.status()
    arr = src._fields["saxs"]
    bob = user_root(tiled_server.uri, idp.token("bob"))
    as_bob = type(arr)(bob.context, item=arr.item, structure_clients=arr.structure_clients)
    with pytest.raises((ClientError, KeyError)) as err:
        src._read_field(as_bob, 0, 23)
    assert any(code in str(err.value) for code in ("401", "403", "404")), err.value
