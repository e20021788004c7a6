"""Tests for cellstage.segment: classical fallback, tiled stitching, Cellpose training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import ellipse


def synthetic_nuclei(shape=(512, 512), n=None, seed=0, diam=(22, 55), border_lines=()):
    """PAS-like pink textured background with purple ellipse 'nuclei'.

    Returns (rgb uint8 (H,W,3), labels uint32 (H,W)). ``border_lines``: list of ('x'|'y', pos)
    — some nuclei are forced to straddle these lines (tile borders).
    """
    rng = np.random.default_rng(seed)
    H, W = shape
    if n is None:
        n = int(H * W / 4500)
    lab = np.zeros(shape, np.uint32)
    occupied = np.zeros(shape, bool)
    k = 0
    forced = [(ax, pos) for ax, pos in border_lines for _ in range(3)]
    tries = 0
    while k < n + len(forced) and tries < 20 * (n + len(forced)):
        tries += 1
        d1, d2 = rng.uniform(*diam), rng.uniform(*diam)
        a, b = max(d1, d2) / 2, min(d1, d2) / 2
        b = max(b, a * 0.6)
        if k < len(forced):
            ax, pos = forced[k]
            if ax == "x":
                cx, cy = pos + rng.uniform(-a / 2, a / 2), rng.uniform(a + 2, H - a - 2)
            else:
                cx, cy = rng.uniform(a + 2, W - a - 2), pos + rng.uniform(-a / 2, a / 2)
        else:
            cy, cx = rng.uniform(a + 2, H - a - 2), rng.uniform(a + 2, W - a - 2)
        rr, cc = ellipse(cy, cx, a, b, shape=shape, rotation=rng.uniform(0, np.pi))
        if len(rr) == 0 or occupied[rr, cc].any():
            continue
        k += 1
        lab[rr, cc] = k
        r0, c0 = max(rr.min() - 3, 0), max(cc.min() - 3, 0)
        occ = np.zeros((rr.max() + 4 - r0, cc.max() + 4 - c0), bool)
        occ[rr - r0, cc - c0] = True
        occ = ndi.binary_dilation(occ, iterations=3)
        occupied[r0:r0 + occ.shape[0], c0:c0 + occ.shape[1]] |= occ[: H - r0, : W - c0]
    # background: pink with low-frequency + fine texture (PAS-like)
    noise = ndi.gaussian_filter(rng.normal(size=shape), 6) * 8 + rng.normal(size=shape) * 5
    img = np.empty(shape + (3,), np.float32)
    base = np.array([232, 182, 208], np.float32)
    img[:] = base + noise[..., None] * np.array([1.0, 1.6, 1.2])
    fib = ndi.gaussian_filter(rng.normal(size=shape), 1.5)
    img[fib > 0.25] -= np.array([10, 40, 20])  # magenta fibres
    # nuclei: haematoxylin purple with chromatin texture, per-nucleus darkness
    dark = rng.uniform(0.75, 1.15, size=k + 1)
    chrom = ndi.gaussian_filter(rng.normal(size=shape), 1.2) * 18
    m = lab > 0
    nuc = np.array([95, 70, 150], np.float32)
    img[m] = nuc * dark[lab[m]][:, None] + chrom[m][:, None]
    img = ndi.gaussian_filter(img, sigma=(0.8, 0.8, 0))
    return np.clip(img, 0, 255).astype(np.uint8), lab


class ArraySlide:
    """In-memory stand-in for cellstage.io.ZarrSlide: level 0 only, white outside."""

    def __init__(self, rgb, mpp=0.17):
        self.rgb = rgb
        self.dimensions = (rgb.shape[1], rgb.shape[0])
        self.mpp = mpp
        self.reads = 0

    def read_region(self, x, y, w, h, level=0):
        assert level == 0
        self.reads += 1
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = self.rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self.rgb[y0:y1, x0:x1]
        return out


def match_objects(gt, pred, thr=0.5):
    """For each GT object: ids of predicted objects with IoU >= thr."""
    from cellpose import metrics

    iou = metrics._intersection_over_union(gt.astype(np.int32), pred.astype(np.int32))[1:, 1:]
    return [np.flatnonzero(row >= thr) for row in iou], iou


def _full_roi(shape):
    from shapely.geometry import box

    return [("all", box(0, 0, shape[1], shape[0]))]


def test_classical_segments_synthetic_nuclei():
    from cellpose import metrics

    from cellstage.segment import segment_classical

    img, gt = synthetic_nuclei((384, 384), seed=3)
    pred = segment_classical(img)
    assert pred.dtype == np.uint32
    ap = metrics.average_precision(gt.astype(np.int32), pred.astype(np.int32), threshold=[0.5])[0]
    assert ap[0] >= 0.9
    # blank tissue → no objects (threshold floor)
    assert segment_classical(np.full((128, 128, 3), (232, 182, 208), np.uint8)).max() == 0


@pytest.mark.parametrize("mode", ["zarr", "callback"])
def test_nucleus_on_tile_border_is_neither_split_nor_duplicated(tmp_path, mode):
    from cellstage.io.labels import create_labels, open_labels
    from cellstage.segment import segment_classical, segment_slide

    tile, overlap = 256, 64
    H, W = 700, 900  # not multiples of the tile: partial edge tiles
    borders = [("x", t) for t in range(tile, W, tile)] + [("y", t) for t in range(tile, H, tile)]
    img, gt = synthetic_nuclei((H, W), seed=7, border_lines=borders)
    # straddling objects exist (several cross x- and y-borders, incl. near corners)
    straddle = sum(len(np.unique(np.concatenate([gt[:, t - 1], gt[:, t]]))) for t in range(tile, W, tile))
    assert straddle > 6
    slide = ArraySlide(img)
    if mode == "zarr":
        arr = create_labels(tmp_path / "s.zarr", (H, W), mpp=0.17, slide="s")
        stats = segment_slide(slide, _full_roi((H, W)), None, arr, tile=tile, overlap=overlap,
                              classical=True, progress=False)
        tiled = open_labels(tmp_path / "s.zarr")[:]
    else:
        tiled = np.zeros((H, W), np.uint32)
        seen = []

        def cb(y0, x0, block):
            seen.append((y0, x0))
            tiled[y0:y0 + block.shape[0], x0:x0 + block.shape[1]] = block

        stats = segment_slide(slide, _full_roi((H, W)), None, cb, tile=tile, overlap=overlap,
                              classical=True, progress=False)
        assert len(seen) == len(set(seen))  # every chunk handed over once
    assert stats["n_tiles"] == 3 * 4
    assert stats["segmenter"].startswith("classical")
    # the fallback runs with one slide-level threshold: compare with the one-piece run at it
    whole = segment_classical(img, threshold=stats["classical_threshold"])
    ids = np.unique(tiled[tiled > 0])
    assert len(ids) == stats["n_nuclei"] == ids.max()  # global ids 1..n, unique
    assert len(ids) == len(np.unique(whole[whole > 0]))
    for ref in (gt, whole):
        hits, _ = match_objects(ref, tiled)
        assert all(len(h) == 1 for h in hits)
    # no predicted object matched by two GT objects, none unmatched
    hits, iou = match_objects(gt, tiled)
    assert (iou >= 0.5).sum(axis=0).max() == 1 and (iou >= 0.5).sum(axis=0).min() == 1


def test_segmentation_restricted_to_rois():
    from shapely.geometry import Point, Polygon

    from cellstage.segment import segment_slide

    img, gt = synthetic_nuclei((600, 1100), seed=11)
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    circ = Polygon(np.c_[300 + 200 * np.cos(t), 300 + 200 * np.sin(t)])
    slide = ArraySlide(img)
    out = np.zeros(gt.shape, np.uint32)
    stats = segment_slide(slide, [("c", circ)], None, out, tile=256, overlap=64, classical=True,
                          progress=False)
    # only the 3x3 grid cells around the circle (x 100..500, y 100..500) are read, not x ≥ 768
    # (+ the classical fallback reads up to 16 of those cores once more for its slide threshold)
    assert stats["n_tiles"] <= 9 and stats["n_tiles"] <= slide.reads <= 2 * stats["n_tiles"]
    from skimage.measure import regionprops

    inside_gt = [r.label for r in regionprops(gt.astype(np.int32))
                 if circ.contains(Point(r.centroid[1], r.centroid[0]))]
    pred = regionprops(out.astype(np.int32))
    assert all(circ.contains(Point(r.centroid[1], r.centroid[0])) for r in pred)
    assert len(pred) == len(inside_gt) == stats["n_nuclei"]
    assert stats["n_outside_roi_dropped"] > 0


def test_missing_model_is_an_error(tmp_path):
    from cellstage.segment import segment_slide, train_segmenter
    from cellstage.utils import CellstageError

    img, gt = synthetic_nuclei((256, 256), seed=1)
    with pytest.raises(CellstageError, match="not found"):
        segment_slide(ArraySlide(img), _full_roi(gt.shape), tmp_path / "nope", np.zeros(gt.shape, np.uint32))
    with pytest.raises(CellstageError, match="not found"):
        train_segmenter([img], [gt], tmp_path / "m", pretrained=str(tmp_path / "nope"))


def test_cellpose_train_save_load_and_tiled_inference(tmp_path):
    """Real Cellpose: a tiny training run (1 step) saves a loadable model + JSON; tiled inference runs."""
    import json

    import torch
    from skimage.segmentation import clear_border

    from cellstage.io.labels import create_labels, labels_attrs, open_labels
    from cellstage.segment import segment_slide, train_segmenter

    torch.set_num_threads(2)
    pairs = [synthetic_nuclei((256, 256), seed=20 + i) for i in range(2)]
    out = tmp_path / "segmenter" / "model"
    res = train_segmenter([p[0] for p in pairs], [p[1] for p in pairs], out, epochs=1,
                          bsize=64, diam_mean=17, nimg_per_epoch=8, seed=0)
    assert out.is_file() and not list(out.parent.glob(".*tmp"))
    meta = json.loads((tmp_path / "segmenter" / "model.json").read_text())
    assert meta["n_train_tiles"] == 1 and meta["n_test_tiles"] == 1 and meta["epochs"] == 1
    # every nucleus of the held-out image not cut by its edge is either found or missed, and
    # AP@0.5 = TP / (TP + FP + FN) of exactly those counts
    [(k, y0, x0)] = meta["eval_tile_origins"]
    interior = len(np.unique(clear_border(pairs[k][1][y0:y0 + 256, x0:x0 + 256]))) - 1
    assert res["ap50_tp"] + res["ap50_fn"] == interior > 5
    assert res["ap50"] == res["ap50_tp"] / (res["ap50_tp"] + res["ap50_fp"] + res["ap50_fn"])
    assert res["diameter"] > 20 and meta["eval_normalization"] == "slide" and list(meta["eval_lowhigh"]) == [str(k)]
    img, _ = synthetic_nuclei((200, 180), seed=5)
    arr = create_labels(tmp_path / "s.zarr", (200, 180), mpp=0.17, slide="s")
    stats = segment_slide(ArraySlide(img), _full_roi((200, 180)), out, arr, tile=128, overlap=32,
                          progress=False)
    assert stats["segmenter"].startswith("cellpose") and stats["n_tiles"] == 4
    lab = open_labels(tmp_path / "s.zarr")
    assert lab.dtype == np.uint32 and lab.chunks == (512, 512) and lab.shape == (200, 180)
    assert labels_attrs(tmp_path / "s.zarr")["mpp"] == 0.17
    assert int(lab[:].max()) == stats["n_nuclei"]


@pytest.mark.slow
def test_cellpose_recipe_reaches_ap50(tmp_path):
    """The project's training recipe (see train_segmenter defaults) reaches AP@0.5 >= 0.8."""
    import torch

    from cellstage.segment import train_segmenter

    torch.set_num_threads(2)
    pairs = [synthetic_nuclei((512, 512), seed=100 + i) for i in range(4)]
    res = train_segmenter([p[0] for p in pairs], [p[1] for p in pairs], tmp_path / "model", seed=0)
    assert res["ap50"] >= 0.8, res


def _oracle_segmenter(monkeypatch, truth: dict, calls: list, *, miss: bool = False):
    """Replace the production segmenter by one that returns the true labels of each tile (or
    nothing with ``miss``) and records the normalisation bounds it was called with."""
    from types import SimpleNamespace

    import cellstage.segment.cellpose_seg as cps

    class Oracle(cps.CellposeSegmenter):
        def __init__(self, model_path, *, diameter=None, batch_size=8, channels=None, gpu=None):
            assert Path(str(model_path)).is_file()  # the saved model is what gets evaluated
            self.channels, self.diameter, self.batch_size = list(channels), diameter, batch_size
            self.model = SimpleNamespace(nchan=2)
            self.lowhigh = None

        def __call__(self, rgb):
            calls.append((rgb.tobytes(), None if self.lowhigh is None else self.lowhigh.copy()))
            lab = truth[rgb.tobytes()]
            return np.zeros_like(lab, np.uint32) if miss else lab.astype(np.uint32)

    monkeypatch.setattr(cps, "CellposeSegmenter", Oracle)


@pytest.mark.parametrize("miss", [False, True])
def test_held_out_ap_is_measured_through_the_segmenter_with_its_slides_normalisation(tmp_path, monkeypatch,
                                                                                      miss):
    """The reported AP is that of the production segmenter: each held-out tile is segmented with
    the normalisation fitted on the slide it was cut from (not on the tile), and a perfect
    segmenter scores AP 1, one that finds nothing AP 0 with every interior nucleus a FN."""
    import torch
    from cellpose import transforms
    from skimage.segmentation import clear_border

    import cellstage.segment.train as seg_train
    from cellstage.segment.train import split_tiles

    torch.set_num_threads(2)
    a, ga = synthetic_nuclei((256, 512), seed=40)
    b, gb = synthetic_nuclei((256, 512), seed=41)
    b = (b * 0.6).astype(np.uint8)  # a darker slide: its bounds differ from the first one's
    b[:, 256:] = np.minimum(b[:, 256:].astype(int) + 60, 255).astype(np.uint8)  # and from its tiles'
    images, masks = [a, b], [ga, gb]
    tiles, tmasks, origins = split_tiles(images, masks, 256, with_origins=True)
    truth = {t.tobytes(): m for t, m in zip(tiles, tmasks)}
    calls: list = []
    _oracle_segmenter(monkeypatch, truth, calls, miss=miss)
    monkeypatch.setattr(seg_train, "fit_cellpose", lambda net, data, *a, **k: {
        "train_losses": np.zeros(1), "resumed_from_epoch": None, "n_train": len(data)})
    res = seg_train.train_segmenter(images, masks, tmp_path / "m", epochs=1, held_out_fraction=0.75,
                                    tile_size=256, seed=0, checkpoint=False)
    held = res["eval_tile_origins"]
    assert res["n_test_tiles"] == len(held) == len(calls) == 3 and {k for k, _, _ in held} == {0, 1}
    interior = sum(len(np.unique(clear_border(masks[k][y:y + 256, x:x + 256]))) - 1 for k, y, x in held)
    if miss:
        assert (res["ap50"], res["ap50_tp"], res["ap50_fp"], res["ap50_fn"]) == (0.0, 0, 0, interior)
    else:
        assert (res["ap50"], res["ap50_tp"], res["ap50_fp"], res["ap50_fn"]) == (1.0, interior, 0, 0)

    def bounds(rgb):  # Cellpose's 1-99 % percentiles of an image, after its channel conversion
        x = transforms.convert_image(rgb, [0, 0], nchan=2).astype(np.float32).reshape(-1, 2)
        lo, hi = np.percentile(x, 1, axis=0), np.percentile(x, 99, axis=0)
        flat = hi - lo <= 0
        lo[flat], hi[flat] = 0.0, 1.0
        return np.stack([lo, hi], axis=1)

    origin_of = {t.tobytes(): o for t, o in zip(tiles, origins)}
    for key, used in calls:
        k, y, x = origin_of[key]
        assert used is not None and np.allclose(used, bounds(images[k]))  # the whole slide's bounds
        assert not np.allclose(used, bounds(images[k][y:y + 256, x:x + 256]))  # not the tile's own
        assert np.allclose(res["eval_lowhigh"][str(k)], used, atol=1e-4)


def test_held_out_ap_leaves_out_nuclei_cut_by_the_tile_edge():
    """A correct mask of an edge-cut nucleus that stops short of the edge is neither TP nor FP."""
    from skimage.draw import disk

    from cellstage.segment.train import held_out_counts

    gt = np.zeros((64, 64), np.int32)
    pr = np.zeros_like(gt)
    gt[disk((20, 20), 6)] = 1                       # interior nucleus, found
    pr[disk((20, 20), 6)] = 5
    rr, cc = disk((3, 40), 7, shape=gt.shape)
    gt[rr, cc] = 2                                   # cut by the top edge ...
    pr[rr[rr >= 1], cc[rr >= 1]] = 7                 # ... its prediction ends one row short
    gt[disk((45, 45), 6)] = 3                        # interior nucleus, missed → FN
    pr[disk((45, 15), 5)] = 9                        # interior false positive → FP
    c = held_out_counts([gt], [pr])
    assert (c["tp"], c["fp"], c["fn"]) == (1, 1, 1) and c["ap"] == pytest.approx(1 / 3)
    assert (c["naive_tp"], c["naive_fp"], c["naive_fn"]) == (1, 2, 1)


def test_pretrained_by_name_falls_back_to_scratch_loudly(tmp_path, monkeypatch, caplog):
    """A model-zoo name whose weights are not in the local Cellpose folder: scratch, said so."""
    import json
    import logging

    import torch
    from cellpose import models

    from cellstage.segment import train_segmenter
    from cellstage.segment.train import resolve_pretrained

    torch.set_num_threads(2)
    monkeypatch.setattr(models, "MODEL_DIR", tmp_path / "zoo")
    assert resolve_pretrained(None) == (None, "scratch")
    with caplog.at_level(logging.WARNING, logger="cellstage.segment"):
        path, init = resolve_pretrained("cyto3")
    assert path is None and "not available locally" in init and "cyto3" in caplog.text
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "nucleitorch_0").write_bytes(b"x")
    assert resolve_pretrained("nuclei")[0] == str(tmp_path / "zoo" / "nucleitorch_0")
    pairs = [synthetic_nuclei((256, 256), seed=30 + i) for i in range(2)]
    train_segmenter([p[0] for p in pairs], [p[1] for p in pairs], tmp_path / "m", epochs=1,
                    pretrained="cyto3", max_eval_tiles=1)
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["pretrained"] is None and meta["init"].startswith("scratch (")


def test_tile_windows_are_clipped_to_the_slide():
    from cellstage.segment import segment_slide

    img, gt = synthetic_nuclei((300, 420), seed=4)
    slide = ArraySlide(img)
    windows = []
    orig = slide.read_region

    def rec(x, y, w, h, level=0):
        windows.append((x, y, w, h))
        return orig(x, y, w, h, level)

    slide.read_region = rec
    segment_slide(slide, _full_roi(gt.shape), None, np.zeros(gt.shape, np.uint32), tile=128,
                  overlap=32, classical=True, progress=False)
    assert windows
    for x, y, w, h in windows:
        assert x >= 0 and y >= 0 and x + w <= 420 and y + h <= 300
    assert (0, 0, 160, 160) in windows and any(x + w == 420 for x, _, w, _ in windows)


def test_finetune_from_model_file_reports_ap_before_and_after(tmp_path, cellpose_model):
    """Issue 14 item 3: training starts from an existing Cellpose model given by path (a model
    the test suite trained and saved itself: the ``cellpose_model`` fixture), and the segmenter
    report carries the starting model's AP@0.5 and the fine-tuned one's, on the same tiles."""
    import torch
    from skimage.segmentation import clear_border

    from cellstage.segment import train_segmenter
    from cellstage.segment.stage import ap_frame

    torch.set_num_threads(2)
    pairs = [synthetic_nuclei((256, 256), seed=40 + i) for i in range(2)]
    res = train_segmenter([p[0] for p in pairs], [p[1] for p in pairs], tmp_path / "m",
                          pretrained=cellpose_model, epochs=1, bsize=64, nimg_per_epoch=8, seed=0)
    assert res["pretrained"] == cellpose_model and res["init"] == f"pretrained file {cellpose_model}"
    [(k, y0, x0)] = res["eval_tile_origins"]
    interior = len(np.unique(clear_border(pairs[k][1][y0:y0 + 256, x0:x0 + 256]))) - 1
    # before and after are scored on the same held-out nuclei
    assert res["ap50_before_tp"] + res["ap50_before_fn"] == res["ap50_tp"] + res["ap50_fn"] == interior > 5
    tp, fp, fn = res["ap50_before_tp"], res["ap50_before_fp"], res["ap50_before_fn"]
    assert res["ap50_before"] == tp / (tp + fp + fn)
    assert tp > 0  # the starting model is a trained model: it finds nuclei before fine-tuning
    table = ap_frame(res)
    assert list(table["model"]) == ["starting model", "fine-tuned"]
    assert table["ap50"].tolist() == [round(res["ap50_before"], 4), round(res["ap50"], 4)]
    assert (table["n_tiles"] == 1).all() and table.loc[0, "source"] == cellpose_model
    # from scratch there is no starting model to score
    scratch = ap_frame({k: v for k, v in res.items() if not k.startswith(("ap50_before", "diameter_before"))})
    assert list(scratch["model"]) == ["trained"]
