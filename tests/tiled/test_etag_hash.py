"""Tiled's server hashes every array response for its ETag (``tiled.server.etag.tokenize``,
dask's tokenize): the fast hasher must be what dask picks in our server's environment, not
sha1 (a declared dependency, ``xxhash``; P3 in benchmarks/post_read.py)."""

from __future__ import annotations

import numpy as np


def test_dask_hashes_array_payloads_with_a_fast_hasher():
    from dask import hashing

    assert hashing.hashers[0].__name__ in ("_hash_cityhash", "_hash_xxhash"), \
        [h.__name__ for h in hashing.hashers]


def test_the_etag_of_an_array_still_tells_contents_apart():
    from tiled.server.etag import tokenize

    a = np.arange(1000, dtype="f8")
    b = a.copy()
    b[500] = -1
    assert tokenize((a, "application/octet-stream")) == tokenize((a.copy(), "application/octet-stream"))
    assert tokenize((a, "application/octet-stream")) != tokenize((b, "application/octet-stream"))
