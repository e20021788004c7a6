"""Tiled segmentation + stitching measured on synthetic slides with known masks.

Measures (issue 3, item 1), on demo-generator sections (`cellstage.demo.render_section`: real
tubule ROIs, touching/overlapping nuclei 15-55 px):

- **split + duplicate rate at tile borders**: *border nuclei* are ground-truth nuclei inside a
  ROI whose mask crosses a tile-core border line. A border nucleus is *split* when two or more
  predicted objects each lie mostly (≥ 50 % of their area) on it and none of them matches it
  (IoU ≥ 0.5); it is *duplicated* when, besides a matching object, another predicted object lies
  mostly on it (a second, partial copy written into the free pixels). The stitching's own rate
  is the number of border nuclei split/duplicated in the tiled result but not in the one-piece
  result (the segmenter's own errors are not the stitching's), over the number of border nuclei.
  Goal ≤ 0.5 %.
- **AP@0.5** (TP / (TP + FP + FN), IoU ≥ 0.5, nuclei whose centroid lies in a ROI) of the tiled
  result equals that of the segmenter run on the slide in one piece, ± 0.01.

Segmenters: a perfect *oracle* (the ground truth cut to the read window, ids permuted) and a
*perturbed oracle* (each tile grows or shrinks every object by 1 px and drops a few, so that
neighbouring tiles disagree at their borders, as a real model does), then the classical
segmenter (colour deconvolution + watershed, deterministic, fast), and a real Cellpose model
(``CELLSTAGE_CELLPOSE_MODEL``, else one trained from scratch by the ``cellpose_model`` fixture;
about 10 s per megapixel on 2 CPU cores).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellstage.segment import segment_slide
from cellstage.segment.classical import segment_classical


class ArraySlide:
    """Level-0-only slide over a numpy image; remembers the last window read (for oracles)."""

    def __init__(self, img):
        self.img = img
        self.last = None

    @property
    def dimensions(self):
        return (self.img.shape[1], self.img.shape[0])

    def read_region(self, x, y, w, h, level=0):
        assert level == 0
        H, W = self.img.shape[:2]
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H, "windows are clipped to the slide"
        self.last = (x, y, w, h)
        return self.img[y:y + h, x:x + w]


def _rois(sec):
    from shapely.geometry import Polygon

    return [(f"tubule_{k}", Polygon(np.asarray(p, float))) for k, p in enumerate(sec.tubules)]


@pytest.fixture(scope="module")
def section():
    from cellstage.demo.render import render_section

    return render_section(7, size=1024, n_tubules=3, tubule_radius=(220.0, 300.0),
                          nuclei_density=7e-4, n_debris=10, n_empty=10, n_interstitial=10)


# ------------------------------------------------------------------------------ measurement
def _in_roi_ids(lab, rois):
    """ids of objects whose centroid lies inside a ROI."""
    import shapely

    ids = np.unique(lab)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return ids
    com = np.array(ndi.center_of_mass(np.ones(lab.shape, np.uint8), lab, ids)).reshape(-1, 2)
    pts = shapely.points(com[:, 1], com[:, 0])
    inside = np.zeros(len(ids), bool)
    for _, p in rois:
        inside |= shapely.contains(p, pts)
    return ids[inside]


def _overlaps(gt, pred):
    """Sparse overlap counts: dict (gt_id, pred_id) -> pixels, and areas of both."""
    m = (gt > 0) & (pred > 0)
    pairs, cnt = np.unique(np.stack([gt[m].astype(np.int64), pred[m].astype(np.int64)]), axis=1,
                           return_counts=True)
    ga = np.bincount(gt.ravel().astype(np.int64))
    pa = np.bincount(pred.ravel().astype(np.int64))
    return pairs, cnt, ga, pa


def ap50(gt, pred, rois):
    """TP/(TP+FP+FN) at IoU ≥ 0.5 over objects with their centroid in a ROI (greedy is exact
    at IoU > 0.5: matches are unique)."""
    g_ids, p_ids = _in_roi_ids(gt, rois), _in_roi_ids(pred, rois)
    gsel = np.isin(gt, g_ids) * gt
    psel = np.isin(pred, p_ids) * pred
    pairs, cnt, ga, pa = _overlaps(gsel, psel)
    iou = cnt / (ga[pairs[0]] + pa[pairs[1]] - cnt)
    tp = int((iou >= 0.5).sum())
    return tp / max(len(g_ids) + len(p_ids) - tp, 1), tp, len(g_ids), len(p_ids)


def border_nuclei(gt, rois, tile):
    """GT ids (centroid in a ROI) whose mask crosses a tile-core border line."""
    ids = _in_roi_ids(gt, rois)
    sl = ndi.find_objects(gt.astype(np.int32))
    out = []
    for i in ids:
        s = sl[i - 1]
        if s is None:
            continue
        y0, y1, x0, x1 = s[0].start, s[0].stop, s[1].start, s[1].stop
        if (y0 // tile != (y1 - 1) // tile) or (x0 // tile != (x1 - 1) // tile):
            out.append(int(i))
    return np.array(out, np.int64)


def split_dup(gt, pred, ids):
    """(split ids, duplicated ids) among GT ``ids`` (definitions in the module docstring)."""
    pairs, cnt, ga, pa = _overlaps(gt, pred)
    split, dup = set(), set()
    for i in ids:
        sel = pairs[0] == i
        p, c = pairs[1][sel], cnt[sel]
        mostly = p[c >= 0.5 * pa[p]]
        iou = c / (ga[i] + pa[p] - c)
        matched = (iou >= 0.5).any()
        if len(mostly) >= 2:
            (dup if matched else split).add(int(i))
    return split, dup


def measure(sec, seg, tile, overlap, **kw):
    rois = _rois(sec)
    slide = ArraySlide(sec.image)
    tiled = np.zeros(sec.labels.shape, np.uint32)
    stats = segment_slide(slide, rois, None, tiled, tile=tile, overlap=overlap, progress=False,
                          segmenter=_bind(seg, slide), **kw)
    # the same segmenter in one piece (after the tiled run: a Cellpose segmenter keeps the
    # slide-level normalisation segment_slide fitted, so only the tiling differs)
    one = np.asarray(seg(sec.image, slide=None) if getattr(seg, "wants_slide", False) else seg(sec.image))
    # one-piece result restricted to ROI nuclei like the tiled one
    one = np.isin(one, _in_roi_ids(one, rois)) * one
    gt = sec.labels
    border = border_nuclei(gt, rois, tile)
    s_t, d_t = split_dup(gt, tiled, border)
    s_o, d_o = split_dup(gt, one, border)
    extra = (s_t | d_t) - (s_o | d_o)
    return {
        "n_border": len(border), "split_tiled": len(s_t), "dup_tiled": len(d_t),
        "split_one": len(s_o), "dup_one": len(d_o), "stitch_rate": len(extra) / max(len(border), 1),
        "ap_tiled": ap50(gt, tiled, rois)[0], "ap_one": ap50(gt, one, rois)[0], "stats": stats,
        "tiled": tiled,
    }


def _bind(seg, slide):
    if getattr(seg, "wants_slide", False):
        return lambda rgb: seg(rgb, slide=slide)
    return seg


class Oracle:
    """Ground truth cut to the window last read (ids permuted); optional per-tile perturbation."""

    wants_slide = True

    def __init__(self, labels, perturb=False, seed=0):
        self.labels, self.perturb = labels, perturb
        self.rng = np.random.default_rng(seed)

    def __call__(self, rgb, slide=None):
        if slide is None:
            lab = self.labels.copy()
        else:
            x, y, w, h = slide.last
            lab = self.labels[y:y + h, x:x + w].copy()
        if self.perturb:  # each tile sees every object 1 px larger or smaller, drops ~2 %
            ids = np.unique(lab)
            ids = ids[ids > 0]
            drop = ids[self.rng.random(len(ids)) < 0.02]
            lab[np.isin(lab, drop)] = 0
            if self.rng.random() < 0.5:
                grown = ndi.grey_dilation(lab, size=3)
                lab = np.where(lab == 0, grown, lab)
            else:
                edge = ndi.grey_erosion(lab, size=3) != ndi.grey_dilation(lab, size=3)
                lab = np.where(edge, 0, lab)
        ids = np.unique(lab)
        ids = ids[ids > 0]
        perm = np.zeros(int(lab.max()) + 1, np.uint32)
        perm[ids] = self.rng.permutation(len(ids)).astype(np.uint32) + 1
        return perm[lab]


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("tile,overlap", [(256, 64), (200, 96)])
def test_oracle_tiled_equals_ground_truth(section, tile, overlap):
    r = measure(section, Oracle(section.labels), tile, overlap)
    assert r["n_border"] >= 30
    assert r["split_tiled"] == 0 and r["dup_tiled"] == 0
    assert r["ap_tiled"] == pytest.approx(r["ap_one"], abs=1e-9)
    assert r["ap_tiled"] >= 0.99


def test_perturbed_tiles_neither_split_nor_duplicate(section):
    """Small tiles (128 px cores, many border nuclei) on three sections: ≥ 200 border nuclei,
    so that the 0.5 % goal is resolved (one failure would be ~0.4 %)."""
    from cellstage.demo.render import render_section

    n_border = n_bad = 0
    secs = [section] + [render_section(s, size=1024, n_tubules=3, tubule_radius=(220.0, 300.0),
                                       nuclei_density=7e-4, n_debris=10, n_empty=10,
                                       n_interstitial=10) for s in (11, 12)]
    for k, sec in enumerate(secs):
        r = measure(sec, Oracle(sec.labels, perturb=True, seed=k), 128, 64)
        n_border += r["n_border"]
        n_bad += r["split_tiled"] + r["dup_tiled"]
        assert abs(r["ap_tiled"] - r["ap_one"]) <= 0.03  # the perturbation itself differs per run
    assert n_border >= 200
    assert n_bad / n_border <= 0.005, (n_bad, n_border)


def test_classical_tiled_vs_one_piece(section):
    # the fallback uses one haematoxylin threshold per slide (segment_slide(classical=True)
    # estimates it); here the same threshold serves the one-piece run
    from functools import partial

    from cellstage.segment.classical import slide_threshold
    from cellstage.segment.tiling import tile_grid

    rois = _rois(section)
    slide = ArraySlide(section.image)
    thr = slide_threshold(slide, rois, tile_grid(rois, slide.dimensions, 256, 24), 256)
    r = measure(section, partial(segment_classical, threshold=thr), 256, 96)
    print({k: v for k, v in r.items() if k != "tiled"})
    assert r["n_border"] >= 30
    assert r["stitch_rate"] <= 0.005, r
    assert abs(r["ap_tiled"] - r["ap_one"]) <= 0.01, r


def test_segment_slide_classical_estimates_one_threshold(section):
    rois = _rois(section)
    tiled = np.zeros(section.labels.shape, np.uint32)
    st = segment_slide(ArraySlide(section.image), rois, None, tiled, tile=256, overlap=96,
                       classical=True, progress=False)
    assert st["segmenter"].startswith("classical (threshold ")
    assert st["n_nuclei"] > 100 and ap50(section.labels, tiled, rois)[0] > 0.5


def test_cellpose_tiled_vs_one_piece(section, cellpose_model):
    import torch

    from cellstage.segment.cellpose_seg import CellposeSegmenter

    torch.set_num_threads(2)
    seg = CellposeSegmenter(cellpose_model, gpu=False)
    r = measure(section, seg, 256, 96)
    print({k: v for k, v in r.items() if k != "tiled"})
    assert r["stitch_rate"] <= 0.005, r
    assert abs(r["ap_tiled"] - r["ap_one"]) <= 0.01, r
