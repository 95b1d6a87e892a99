"""Masks <-> polygons (backend.polygons): outlines, simplification, rasterising as Label Studio draws, bad polygons,
and the predictions made of them (backend.shapes). No server needed; one test draws in a real Chromium canvas."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from backend.config import POLYGON_TOLERANCE_PX
from backend.labeling import RECOMMENDED_CONFIG, parse_labeling_config
from backend.polygons import (
    MAX_POLYGONS,
    PolygonError,
    check,
    check_tolerance,
    rasterize,
    region_points,
    trace,
)
from backend.shapes import prediction
from model.synthetic import make_scene

CHROMIUM = Path("/usr/bin/chromium")
POLYGON_CONFIG = """<View><Image name="image" value="$image"/><TextArea name="query" toName="image"/>
<PolygonLabels name="outline" toName="image"><Label value="Target"/><Label value="Knife"/></PolygonLabels>
<TextArea name="lisa" toName="image" readonly="true"/></View>"""
BOTH_CONFIG = RECOMMENDED_CONFIG.replace(
    "</BrushLabels>", '</BrushLabels><PolygonLabels name="outline" toName="image"><Label value="Target"/>'
                      "</PolygonLabels>")


def masks() -> dict[str, np.ndarray]:
    """Hard cases for an outline tracer: diagonal pinches, noise, holes, 1-px lines, pieces at the border."""
    rng = np.random.default_rng(0)
    ring = np.zeros((40, 40), bool)
    ring[5:35, 5:35] = True
    ring[12:28, 12:28] = False
    ring[18:22, 18:22] = True  # an island in the hole
    return {
        "checkerboard": np.indices((30, 40)).sum(0) % 2 == 0,
        "noise": rng.random((50, 60)) < 0.3,
        "dense noise": rng.random((50, 60)) < 0.55,
        "blobs": ndimage.zoom(rng.random((8, 9)), 8, order=1) > 0.5,
        "diagonal line": np.pad(np.eye(30, dtype=bool), 3),
        "ring with island": ring,
        "border": np.ones((10, 12), bool),
        "one pixel": np.pad(np.ones((1, 1), bool), 4),
    }


@pytest.mark.parametrize("name", list(masks()))
def test_unsimplified_outlines_rasterise_back_to_the_mask_with_holes_filled(name):
    mask = masks()[name]
    height, width = mask.shape
    polygons = trace(mask, 0, limit=None)
    assert np.array_equal(rasterize(polygons, width, height), ndimage.binary_fill_holes(mask))
    for tolerance in (0, POLYGON_TOLERANCE_PX, 1, 3):  # every outline is one an annotation may bring back
        assert all(check(p, width, height) is None for p in trace(mask, tolerance, limit=None)), tolerance


def test_simplification_keeps_the_masks_of_synthetic_scenes():
    """On held-out scenes of the demo model's kind (128 px), the default tolerance keeps IoU >= 0.98 on average;
    a larger tolerance makes fewer vertices."""
    shapes = [m for seed in range(40) for m in make_scene(10_000_000 + seed, size=128).shape_masks]
    ious, vertices = {}, {}
    for tolerance in (0.0, POLYGON_TOLERANCE_PX, 2.0):
        scores, counts = [], []
        for mask in shapes:
            polygons = trace(mask, tolerance)
            back = rasterize(polygons, 128, 128)
            scores.append((back & mask).sum() / (back | mask).sum())
            counts += [len(p) for p in polygons]
        ious[tolerance], vertices[tolerance] = float(np.mean(scores)), float(np.mean(counts))
    assert ious[0.0] == 1.0
    assert ious[POLYGON_TOLERANCE_PX] >= 0.98
    assert vertices[0.0] > vertices[POLYGON_TOLERANCE_PX] > vertices[2.0]


def test_pieces_are_kept_largest_first_and_specks_dropped():
    mask = np.zeros((30, 60), bool)
    mask[2:6, 2:6] = True  # 16 px
    mask[10:20, 20:40] = True  # 200 px
    mask[25, 50] = True  # a speck
    polygons = trace(mask, 0, min_area=10)
    assert len(polygons) == 2
    assert rasterize(polygons[:1], 60, 30).sum() == 200
    many = np.zeros((100, 100), bool)
    many[::4, ::4] = True  # 625 specks
    assert len(trace(many, 0)) == MAX_POLYGONS
    # An interactive answer says that it holds only the largest pieces.
    setup = parse_labeling_config(POLYGON_CONFIG)
    pred = prediction(many[None], [0.5], setup, "Target", "v1", "the dots", tolerance=0.5, message=True)
    assert [r["type"] for r in pred["result"]].count("polygonlabels") == MAX_POLYGONS
    assert pred["result"][-1]["value"]["text"] == [
        f"LISA found 625 separate pieces for 'the dots'; showing the {MAX_POLYGONS} largest as polygons (at most "
        f"{MAX_POLYGONS} per mask)."]


# ---- rasterising as Label Studio draws ---------------------------------------------------------------------------


def outlines() -> list[tuple[list[np.ndarray], int, int]]:
    """Polygons to draw: traced ones (simplified), and hand-drawn concave ones with off-grid points."""
    rng = np.random.default_rng(1)
    cases = []
    for name in ("blobs", "ring with island", "noise"):
        mask = masks()[name]
        cases.append((trace(mask, 1.0), mask.shape[1], mask.shape[0]))
    for _ in range(4):
        angles = np.sort(rng.random(9)) * 2 * np.pi
        radii = 8 + 12 * rng.random(9)
        star = np.stack([32 + radii * np.cos(angles), 24 + radii * np.sin(angles)], axis=1)
        cases.append(([star], 64, 48))
    return cases


def edge_pixels(polygons: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """Pixels an outline passes through (their centre within half a diagonal of an edge)."""
    cy, cx = np.mgrid[0:height, 0:width] + 0.5
    centres = np.stack([cx.ravel(), cy.ravel()], axis=1)
    near = np.zeros(len(centres), bool)
    for p in polygons:
        for a, b in zip(p, np.roll(p, -1, axis=0)):
            ab = b - a
            t = np.clip(((centres - a) @ ab) / max(float(ab @ ab), 1e-12), 0, 1)
            near |= np.hypot(*(centres - (a + t[:, None] * ab)).T) <= 0.7072
    return near.reshape(height, width)


def pil_coverage(polygons: list[np.ndarray], width: int, height: int, scale: int = 8) -> np.ndarray:
    """Pixels at least half covered, from PIL's ImageDraw polygon fill at ``scale`` x (an anti-aliased fill read
    with alpha >= 128, as Label Studio's canvas is)."""
    im = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(im)
    for p in polygons:
        draw.polygon([tuple(q) for q in p * scale - 0.5], fill=255)
    big = np.asarray(im, dtype=np.float64) / 255
    return big.reshape(height, scale, width, scale).mean(axis=(1, 3)) >= 0.5


@pytest.mark.parametrize("case", range(len(outlines())))
def test_rasterising_matches_a_polygon_fill_but_for_edge_pixels(case):
    polygons, width, height = outlines()[case]
    ours, pil = rasterize(polygons, width, height), pil_coverage(polygons, width, height)
    differ = ours != pil
    assert not (differ & ~edge_pixels(polygons, width, height)).any()
    assert differ.sum() <= 0.2 * edge_pixels(polygons, width, height).sum()


_CANVAS_JS = """([w, h, polys]) => {
  const canvas = document.createElement('canvas'); canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext('2d'); ctx.fillStyle = 'rgba(255, 0, 0, 1)';
  for (const p of polys) {  // what Konva does for a closed Line with a fill: one path, closed, filled
    ctx.beginPath(); ctx.moveTo(p[0][0], p[0][1]);
    for (const q of p.slice(1)) ctx.lineTo(q[0], q[1]);
    ctx.closePath(); ctx.fill();
  }
  const data = ctx.getImageData(0, 0, w, h).data, alpha = new Uint8Array(w * h);
  for (let i = 0; i < w * h; i++) alpha[i] = data[4 * i + 3];
  let s = ''; for (const v of alpha) s += String.fromCharCode(v); return btoa(s);
}"""


def test_rasterising_matches_a_chromium_canvas_but_for_edge_pixels():
    """Label Studio draws polygons with Konva on a 2D canvas: draw the same polygons in headless Chromium and read
    the fill back with alpha >= 128 (the brush threshold): only pixels an outline crosses may differ."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing (dev extra)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto("about:blank")
            for polygons, width, height in outlines():
                encoded = page.evaluate(_CANVAS_JS, [width, height, [p.tolist() for p in polygons]])
                canvas = np.frombuffer(base64.b64decode(encoded), np.uint8).reshape(height, width) >= 128
                differ = rasterize(polygons, width, height) != canvas
                edges = edge_pixels(polygons, width, height)
                assert not (differ & ~edges).any()
                assert differ.sum() <= 0.2 * edges.sum()
        finally:
            browser.close()


# ---- polygons read from annotations ------------------------------------------------------------------------------


def region(points: object) -> dict:
    return {"id": "r1", "type": "polygonlabels", "value": {"points": points, "polygonlabels": ["Target"]}}


@pytest.mark.parametrize(("points", "message"), [
    ([[10, 10], [50, 50]], "has 2 distinct point"),
    ([[10, 10], [50, 50], [10, 10]], "has 2 distinct point"),
    ([[10, 10], [50, 10], [50, 150]], "outside the 200x100 image"),
    ([[-5, 10], [50, 10], [50, 50]], "outside"),
    ([[10, 10], [50, 50], [50, 10], [10, 50]], "crosses itself"),  # a bow tie
    ([[10, 10], [20, 20], [30, 30]], "no area"),
    ("10,10 50,50", "not a list"),
    ([[10, 10], [50, "x"], [50, 50]], "not a list"),
    ([[10, 10], [50, float("nan")], [50, 50]], "not a list"),
])
def test_bad_polygons_are_refused_with_a_reason(points, message):
    with pytest.raises(PolygonError, match=message):
        region_points(region(points), 200, 100)


def test_edge_points_and_touching_outlines_are_accepted():
    # On the border (and a rounding error beyond it): clipped into the image.
    points = region_points(region([[0, 0], [100.1, 0], [100, 100], [0, 100]]), 200, 100)
    assert points.max(axis=0).tolist() == [200, 100]
    assert rasterize([points], 200, 100).all()
    # Two lobes meeting at one point (a pinch) and an edge run back along itself: not a crossing.
    pinch = [[10, 10], [30, 10], [30, 30], [50, 30], [50, 50], [30, 50], [30, 30], [10, 30]]
    assert check(np.array(pinch, float), 200, 100) is None


def test_polygon_tolerance_setting():
    assert check_tolerance("1.5") == 1.5 and check_tolerance(0) == 0
    for bad in (-1, "x", None, True, float("nan"), 1000):
        with pytest.raises(ValueError, match="polygon_tolerance"):
            check_tolerance(bad)


# ---- predictions -------------------------------------------------------------------------------------------------


def two_piece_mask() -> np.ndarray:
    mask = np.zeros((40, 80), bool)
    mask[5:25, 5:30] = True
    mask[10:30, 50:70] = True
    return mask


def test_a_polygon_config_gets_one_polygon_per_piece():
    setup = parse_labeling_config(POLYGON_CONFIG)
    assert (setup.brush_name, setup.polygon_name, setup.labels) == ("", "outline", ("Target", "Knife"))
    pred = prediction(two_piece_mask()[None], [0.9], setup, "Knife", "v1", "the knife", tolerance=0.5)
    assert [r["type"] for r in pred["result"]] == ["polygonlabels", "polygonlabels"]
    first = pred["result"][0]
    assert first["from_name"] == "outline" and first["to_name"] == "image" and first["origin"] == "prediction"
    assert (first["original_width"], first["original_height"]) == (80, 40)
    assert first["value"]["polygonlabels"] == ["Knife"] and first["value"]["closed"] is True
    assert first["meta"] == {"prompt": "the knife", "model_version": "v1", "sam_score": 0.9}
    back = rasterize([region_points(r, 80, 40) for r in pred["result"]], 80, 40)
    assert np.array_equal(back, two_piece_mask())


def test_a_config_with_both_gets_both_and_a_refinement_reuses_each_kinds_ids():
    setup = parse_labeling_config(BOTH_CONFIG)
    pred = prediction(two_piece_mask()[None], [0.9], setup, "Target", "v1", "q", tolerance=0.5)
    kinds = [r["type"] for r in pred["result"]]
    assert kinds == ["brushlabels", "polygonlabels", "polygonlabels"]
    ids = [r["id"] for r in pred["result"]]
    assert not ids[0].startswith("p") and all(i.startswith("p") for i in ids[1:])
    one_piece = two_piece_mask()
    one_piece[:, 40:] = False
    again = prediction(one_piece[None], [0.8], setup, "Target", "v1", "q", tolerance=0.5, ids=ids)
    assert [(r["type"], r["id"]) for r in again["result"]] == [("brushlabels", ids[0]), ("polygonlabels", ids[1])]


def test_nothing_found_says_so_once():
    setup = parse_labeling_config(POLYGON_CONFIG)
    empty = np.zeros((1, 40, 80), bool)
    pred = prediction(empty, [0.9], setup, "Target", "v1", "the moon", tolerance=0.5, message=True)
    assert [r["type"] for r in pred["result"]] == ["textarea"]
    assert "found nothing matching 'the moon'" in pred["result"][0]["value"]["text"][0]
    speck = np.zeros((1, 40, 80), bool)
    speck[0, 3, 3] = True  # under min_area: noise, not a region
    assert prediction(speck, [0.9], setup, "Target", "v1", "q", tolerance=0.5, min_area=16)["result"] == []
