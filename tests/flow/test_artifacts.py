"""The result artifact's markdown and image (pure logic; the e2e tests check it is created)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from visitflow.flow.builder import _png_data_uri, result_markdown
from visitflow.flow.builder import analysis


def decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_small_image_is_enlarged_by_whole_pixels():
    img = np.zeros((64, 32))
    img[10, 5] = 100.0
    png = decode(_png_data_uri(img))
    assert png.shape == (256, 128)                     # 4× on both axes, aspect kept
    assert png[40:44, 20:24].min() == 255 and png[44, 24] == 0 and png.max() == 255


def test_large_image_is_subsampled():
    img = np.random.default_rng(0).uniform(size=(1000, 500))
    assert decode(_png_data_uri(img)).shape == (250, 125)


def test_hot_pixel_does_not_flatten_the_contrast():
    img = np.tile(np.linspace(0, 1, 100), (100, 1))
    img[0, 0] = 1e9
    row = decode(_png_data_uri(img)).astype(int)[50]
    assert row[::25].tolist() == sorted(row[::25].tolist()) and row[-1] - row[0] > 200


@pytest.mark.parametrize("bad", [np.ones(5), np.full((4, 4), np.nan), np.zeros((0, 3))])
def test_no_image_for_non_2d_or_empty(bad):
    assert _png_data_uri(bad) is None


def test_markdown_has_a_row_per_output_and_an_image_for_2d_only():
    @analysis(reads=["saxs"])
    def demo_md(saxs):
        return {"average": saxs.mean(axis=0), "total": float(saxs.sum())}

    frames = np.arange(2 * 8 * 8, dtype=float).reshape(2, 8, 8)
    md = result_markdown(demo_md.spec, demo_md.spec.compute({"saxs": frames}), visit="a1", run_id="c8bc37a0-xyz",
                         variant="post", frames=2, result_uri="http://t/processed/a1/x")
    assert "visit a1, run c8bc37a0" in md and "2 frames processed" in md
    assert "| average | (8, 8) | float64 | 32 | 63.5 | 95 |" in md
    assert "| total | 8128 |" in md
    assert md.index("| output | value |") < md.index("| array |")
    assert md.count("![") == 1 and "![average](data:image/png;base64," in md
