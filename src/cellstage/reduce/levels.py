"""Seed 003's three data-reduction levels on one converted slide, and its Table 2.

Stage entry points (every argument a config value) are in :mod:`cellstage.reduce.aml_stage`;
the filters themselves in :mod:`cellstage.reduce.filters`.

**Level One** (§2.1.1, :func:`level_one`): "the original images are divided into 8×8 grids …
From each grid we dismiss the outer four columns and the outer two rows … so that the innermost
24 large patches remain" (Fig. 1: x ∈ {2..5}, y ∈ {1..6}). Tile edges are
``floor(i * length / parts)``; each inner tile is split into ``patch_size`` patches (paper 512)
from its top-left corner, and the strip of a tile narrower than a patch is not examined (it
still counts in the selection). Per patch: Laplace-variance blur filter L(·) (low variance =
blurry, removed); K-means K(·) on CIELab a/b, "k = 3 … selected blast cluster centroids based on
the highest … red colour value" (``criterion="red"``); morphological clean-up M(·) (closing,
holes filled, objects under ``min_cell_area`` px removed); then "the individual contours …
their absolute number and respective area coverage": the 8-connected components of the mask
(the outer contours, holes being filled) are counted and their pixel areas measured, with
"thresholds for the minimum and maximum number of clusters as well as the maximum area of a
cell". Checks, first failing one named in ``reason``: ``blur``, ``cell_too_large`` (dense
clutter merges into one blob larger than any cell, so it is tested before the counts),
``too_few_cells``, ``too_many_cells``.

**Level Two** (§2.1.2, :func:`level_two`): "80×80 pixel crops centered around each cell",
compactness perimeter²/area, "K-Means clustering C(·) with k = 2", the rounder cluster kept
(:func:`cellstage.reduce.filters.keep_compact`, per slide). A crop reaching outside its Level
One patch is **shifted** inside the patch (never padded: every pixel is real), so a cell within
``crop_size/2`` of the patch edge is off-centre by the shift; ``y0``/``x0`` give the window.
Compactness is that of the cell's own component, cut to the window (neighbours in the window do
not count). ``bg``: the crop with background; ``nobg``: "a crop in which the non-cell background
pixels are set to zero", cut from the Level One cell mask (every cell pixel of the window kept,
including neighbours' — §2.1.2 cuts c^cell from p^cell — everything else 0, black). ``masks``:
the centred cell's own pixels.

**Level Three** (§2.1.3, :func:`grade_level_two`): the grading network (ResNet18, grades 5-6
unsuitable) on the Level Two kept crops with background (the grader is trained on such crops).

**Table 2** (:func:`aml_reduction_table`): "Reduction" = percentage of pixels removed against
the original selection, and the number of images, per level and task.

Stores are zarr v3 groups whose arrays keep one item per inner chunk, sharded as the crop store
(:mod:`cellstage.crops.store`: ``bytes`` → ``blosc`` lz4, chunk ``(1, …)``), so
:class:`~cellstage.crops.store.CropStoreReader` reads any item with one ``pread``. Every output is
written into a temporary and renamed (:func:`cellstage.utils.atomic_path`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..utils import CellstageError, atomic_path
from .filters import central_compactness, keep_compact, lab_kmeans_nuclei, laplacian_variance

log = logging.getLogger("cellstage.reduce")

LEVELS = ("Level One", "Level Two", "Level Three")
REASONS = ("blur", "cell_too_large", "too_few_cells", "too_many_cells")
CRITERIA = ("red", "purple", "blue")
SHARD_BYTES = 8 << 20  # items per shard: about 8 MiB uncompressed (16 patches of 512², 436 crops of 80²)


# --------------------------------------------------------------------------- item stores
class _ItemStore:
    """Append equally long item arrays to a zarr v3 group, one whole shard per write.

    ``specs``: name → (item shape, dtype). Arrays start empty and grow; items are buffered
    until a shard is full, so every write but the last covers a whole shard (no read-modify-write)
    and memory stays at one shard per array.
    """

    def __init__(self, root, specs: dict):
        from zarr.codecs import BloscCodec

        from ..crops.store import _CODEC, _KEY, SHARD_CROPS

        item_bytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in specs.values())
        self.shard = int(np.clip(SHARD_BYTES // item_bytes, 1, SHARD_CROPS))
        self.arrays = {}
        for name, (shape, dtype) in specs.items():
            self.arrays[name] = root.create_array(
                name, shape=(0, *shape), chunks=(1, *shape), shards=(self.shard, *shape), dtype=dtype,
                compressors=[BloscCodec(**_CODEC)], fill_value=False if dtype == "bool" else 0,
                chunk_key_encoding=_KEY, dimension_names=("n", "y", "x", "c")[: 1 + len(shape)],
            )
        self._buf: dict[str, list] = {name: [] for name in specs}
        self._pending = 0
        self.n = 0

    def add(self, **items: np.ndarray) -> int:
        """Append one item per array; returns its row."""
        if set(items) != set(self.arrays):
            raise ValueError(f"add() needs {sorted(self.arrays)}, got {sorted(items)}")
        for name, item in items.items():
            self._buf[name].append(np.asarray(item))
        self._pending += 1
        row = self.n + self._pending - 1
        if self._pending >= self.shard:
            self._flush()
        return row

    def _flush(self) -> None:
        if not self._pending:
            return
        for name, arr in self.arrays.items():
            block = np.stack(self._buf[name]).astype(arr.dtype, copy=False)
            arr.resize((self.n + self._pending, *arr.shape[1:]))
            arr[self.n: self.n + self._pending] = block
            self._buf[name] = []
        self.n += self._pending
        self._pending = 0

    def close(self) -> int:
        """Write what is buffered; returns the number of items."""
        self._flush()
        return self.n


# --------------------------------------------------------------------------- Level One
@dataclass(frozen=True)
class PatchRule:
    """Level One's per-patch parameters (seed 003 §2.1.1; see the module docstring)."""

    blur_threshold: float
    kmeans_k: int
    criterion: str
    min_contrast: float
    min_cells: int
    max_cells: int
    max_cell_area: int
    min_cell_area: int
    closing_radius: int
    seed: int

    def check(self) -> None:
        bad = []
        if not self.blur_threshold >= 0:
            bad.append(f"blur_threshold={self.blur_threshold} (must be >= 0)")
        if self.kmeans_k < 2:
            bad.append(f"kmeans_k={self.kmeans_k} (must be >= 2; seed 003 uses 3)")
        if self.criterion not in CRITERIA:
            bad.append(f"criterion={self.criterion!r} (one of {', '.join(CRITERIA)}; seed 003: red)")
        if not self.min_contrast >= 0:
            bad.append(f"min_contrast={self.min_contrast} (must be >= 0)")
        if not 0 <= self.min_cells <= self.max_cells:
            bad.append(f"min_cells={self.min_cells}, max_cells={self.max_cells} (need 0 <= min_cells <= max_cells)")
        if not 0 <= self.min_cell_area < self.max_cell_area:
            bad.append(f"min_cell_area={self.min_cell_area}, max_cell_area={self.max_cell_area} "
                       "(need 0 <= min_cell_area < max_cell_area)")
        if self.closing_radius < 0:
            bad.append(f"closing_radius={self.closing_radius} (must be >= 0)")
        if bad:
            raise CellstageError("Level One parameters: " + "; ".join(bad))


def examine_patch(patch: np.ndarray, rule: PatchRule) -> tuple[dict, np.ndarray | None]:
    """Level One on one RGB patch: (measures, cell mask or None when blurred).

    measures: ``laplace_var``, ``n_cells`` and ``max_area`` (-1 when the patch was not segmented,
    i.e. blurred), ``reason`` ("" when kept, else one of :data:`REASONS`).
    """
    import cv2

    lv = laplacian_variance(patch)
    if lv < rule.blur_threshold:
        return {"laplace_var": lv, "n_cells": -1, "max_area": -1, "reason": "blur"}, None
    mask = lab_kmeans_nuclei(patch, k=rule.kmeans_k, seed=rule.seed, criterion=rule.criterion,
                             closing_radius=rule.closing_radius, min_size=rule.min_cell_area,
                             min_contrast=rule.min_contrast)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    n_cells, max_area = int(n - 1), int(areas.max()) if n > 1 else 0
    if max_area > rule.max_cell_area:
        reason = "cell_too_large"
    elif n_cells < rule.min_cells:
        reason = "too_few_cells"
    elif n_cells > rule.max_cells:
        reason = "too_many_cells"
    else:
        reason = ""
    return {"laplace_var": lv, "n_cells": n_cells, "max_area": max_area, "reason": reason}, mask


def grid_edges(length: int, parts: int) -> np.ndarray:
    """The ``parts + 1`` tile edges of a grid over ``length`` px: ``floor(i * length / parts)``."""
    return (np.arange(parts + 1, dtype=np.int64) * int(length)) // int(parts)


def level_one_patches(width: int, height: int, *, grid, keep_rows, keep_cols, patch_size: int,
                      where: str = "slide") -> tuple[pd.DataFrame, int]:
    """The patches Level One examines, in order: DataFrame(patch, row, col, y, x) (tile row/col,
    slide px of the patch origin), and the selection's pixel count (area of the kept tiles).

    ``grid`` (rows, cols); ``keep_rows``/``keep_cols``: first and last kept tile, inclusive
    (seed 003: grid (8, 8), rows 1..6, cols 2..5 = 24 tiles). A kept tile smaller than one patch
    is an error (lower ``patch_size`` or the grid).
    """
    rows, cols = (int(v) for v in grid)
    r0, r1 = (int(v) for v in keep_rows)
    c0, c1 = (int(v) for v in keep_cols)
    P = int(patch_size)
    bad = []
    if rows < 1 or cols < 1:
        bad.append(f"grid={tuple(grid)} (rows and cols must be >= 1)")
    elif not (0 <= r0 <= r1 < rows and 0 <= c0 <= c1 < cols):
        bad.append(f"keep_rows={tuple(keep_rows)}, keep_cols={tuple(keep_cols)} must lie inside grid "
                   f"{rows}x{cols} (0-based, first <= last)")
    if P < 8:
        bad.append(f"patch_size={P} (must be >= 8)")
    if bad:
        raise CellstageError("Level One grid: " + "; ".join(bad))
    ey, ex = grid_edges(height, rows), grid_edges(width, cols)
    out, selection = [], 0
    for r in range(r0, r1 + 1):
        for c in range(c0, c1 + 1):
            th, tw = int(ey[r + 1] - ey[r]), int(ex[c + 1] - ex[c])
            if th < P or tw < P:
                raise CellstageError(
                    f"{where}: tile row {r} col {c} is {tw}x{th} px, smaller than patch_size {P} "
                    f"(slide {width}x{height} px on a {rows}x{cols} grid): lower patch_size or the grid"
                )
            selection += th * tw
            ys = ey[r] + P * np.arange(th // P)
            xs = ex[c] + P * np.arange(tw // P)
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            out.append(pd.DataFrame({"row": r, "col": c, "y": yy.ravel(), "x": xx.ravel()}))
    table = pd.concat(out, ignore_index=True).astype({"row": "int64", "col": "int64", "y": "int64", "x": "int64"})
    table.insert(0, "patch", np.arange(len(table), dtype=np.int64))
    return table, int(selection)


def level_one(slide_store, out_zarr, out_parquet, *, grid, keep_rows, keep_cols, patch_size: int,
              blur_threshold: float, kmeans_k: int, criterion: str, min_contrast: float, min_cells: int,
              max_cells: int, max_cell_area: int, min_cell_area: int, closing_radius: int, seed: int,
              slide: str) -> pd.DataFrame:
    """Level One of one converted slide (``results/slides/{slide}.ome.zarr``); returns the table.

    Reads one row of patches of one tile at a time (memory: a patch band, not a tile or slide).
    Runs on one thread (OpenMP/BLAS limited to 1: scikit-learn's K-means on one patch is ~20×
    slower with a thread pool competing for busy cores, measured 0.37 s vs 0.018 s per 96² patch);
    Snakemake runs slides in parallel.
    ``out_zarr``: arrays ``patches`` (N, P, P, 3) uint8 and ``masks`` (N, P, P) bool of the kept
    patches; group attributes ``slide``, ``patch_size``, ``selection_px``, ``grid``, ``keep_rows``,
    ``keep_cols``. ``out_parquet``: one row per examined patch — slide, patch, row, col, y, x,
    laplace_var, n_cells, max_area, kept, reason, store_index (row in the arrays, -1 if dropped),
    selection_px (the kept tiles' pixel count, the same on every row).
    """
    import zarr
    from threadpoolctl import threadpool_limits

    from ..io.slides import ZarrSlide

    rule = PatchRule(float(blur_threshold), int(kmeans_k), str(criterion), float(min_contrast), int(min_cells),
                     int(max_cells), int(max_cell_area), int(min_cell_area), int(closing_radius), int(seed))
    rule.check()
    P = int(patch_size)
    t0 = time.perf_counter()
    src = ZarrSlide(slide_store)
    try:
        W, H = src.dimensions
        plan, selection = level_one_patches(W, H, grid=grid, keep_rows=keep_rows, keep_cols=keep_cols,
                                            patch_size=P, where=str(slide_store))
        measures, store_index = [], np.full(len(plan), -1, np.int64)
        with threadpool_limits(1), atomic_path(out_zarr) as tz, atomic_path(out_parquet) as tp:
            root = zarr.open_group(str(tz), mode="w", zarr_format=3)
            store = _ItemStore(root, {"patches": ((P, P, 3), "uint8"), "masks": ((P, P), "bool")})
            # one band per (tile, patch row): patches of a band are consecutive in the plan
            band_key = plan["row"].to_numpy() * (1 << 40) + plan["col"].to_numpy() * (1 << 20) + plan["y"].to_numpy()
            cuts = np.flatnonzero(np.diff(band_key)) + 1
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(plan)]):
                y, xs = int(plan["y"].iat[a]), plan["x"].to_numpy()[a:b]
                x0 = int(xs[0])
                band = src.read_region(x0, y, int(xs[-1]) + P - x0, P, 0)
                for i, x in zip(range(a, b), xs.tolist()):
                    patch = band[:, x - x0: x - x0 + P]
                    m, mask = examine_patch(patch, rule)
                    measures.append(m)
                    if not m["reason"]:
                        store_index[i] = store.add(patches=patch, masks=mask)
            n_kept = store.close()
            root.attrs.update({"slide": str(slide), "patch_size": P, "selection_px": selection,
                               "grid": [int(v) for v in grid], "keep_rows": [int(v) for v in keep_rows],
                               "keep_cols": [int(v) for v in keep_cols]})
            m = pd.DataFrame(measures)
            table = pd.DataFrame({
                "slide": str(slide), "patch": plan["patch"], "row": plan["row"], "col": plan["col"],
                "y": plan["y"], "x": plan["x"], "laplace_var": m["laplace_var"].astype("float64"),
                "n_cells": m["n_cells"].astype("int64"), "max_area": m["max_area"].astype("int64"),
                "kept": m["reason"].eq("").to_numpy(), "reason": m["reason"].astype(str),
                "store_index": store_index, "selection_px": np.int64(selection),
            })
            table.to_parquet(tp, index=False)
    finally:
        src.close()
    counts = table["reason"].replace("", "kept").value_counts().to_dict()
    log.info("Level One %s: %d patches examined, %d kept (%s) in %.1f s", slide, len(table), n_kept, counts,
             time.perf_counter() - t0)
    return table


# --------------------------------------------------------------------------- Level Two
L1_COLUMNS = ("slide", "patch", "y", "x", "kept", "store_index")


def _read_level_one(level_one_zarr, level_one_parquet):
    from ..crops.store import CropStoreReader

    table = pd.read_parquet(level_one_parquet)
    missing = set(L1_COLUMNS) - set(table.columns)
    if missing:
        raise CellstageError(f"{level_one_parquet}: missing column(s) {sorted(missing)}: not a Level One table "
                             "(rerun level_one)")
    kept = table[table["kept"]].sort_values("store_index")
    patches, masks = CropStoreReader(level_one_zarr, "patches"), CropStoreReader(level_one_zarr, "masks")
    if not (kept["store_index"].to_numpy() == np.arange(len(kept))).all() or len(patches) != len(kept) \
            or len(masks) != len(kept):
        raise CellstageError(
            f"{level_one_zarr} holds {len(patches)} patches / {len(masks)} masks but {level_one_parquet} lists "
            f"{len(kept)} kept patches (store_index 0..n-1 expected): the two are from different runs, rerun level_one"
        )
    return kept, patches, masks


def level_two(level_one_zarr, level_one_parquet, out_zarr, out_parquet, *, crop_size: int, min_separation: float,
              seed: int, slide: str) -> pd.DataFrame:
    """Level Two of one slide from its Level One outputs; returns the table.

    One candidate crop per cell (8-connected component of a kept patch's mask, centred on its
    centroid; shifted inside the patch, see the module docstring). ``out_zarr``: arrays ``bg``
    (N, c, c, 3) uint8, ``nobg`` (N, c, c, 3) uint8 (non-cell pixels 0) and ``masks`` (N, c, c)
    bool (the centred cell) for **all** candidates, row = ``crop``. ``out_parquet``: slide, crop,
    patch (Level One id), y, x (slide px of the cell centroid), y0, x0 (slide px of the window),
    area (cell px), compactness (perimeter²/area), kept.
    """
    import cv2
    import zarr
    from threadpoolctl import threadpool_limits

    c = int(crop_size)
    if not min_separation >= 1.0:
        raise CellstageError(f"Level Two: min_separation={min_separation} must be >= 1 (a ratio of cluster centres)")
    t0 = time.perf_counter()
    kept, patches, masks = _read_level_one(level_one_zarr, level_one_parquet)
    P = int(patches.shape[1])
    if not 4 <= c <= P:
        raise CellstageError(f"Level Two: crop_size={c} must lie in 4..{P} (the Level One patch size of "
                             f"{level_one_zarr})")
    rows: dict[str, list] = {k: [] for k in ("patch", "y", "x", "y0", "x0", "area", "compactness")}
    try:
        with threadpool_limits(1), atomic_path(out_zarr) as tz, atomic_path(out_parquet) as tp:
            root = zarr.open_group(str(tz), mode="w", zarr_format=3)
            store = _ItemStore(root, {"bg": ((c, c, 3), "uint8"), "nobg": ((c, c, 3), "uint8"),
                                      "masks": ((c, c), "bool")})
            for i, (pid, py, px) in enumerate(kept[["patch", "y", "x"]].itertuples(index=False)):
                try:
                    img, mask = patches[i], masks[i]
                except Exception as e:
                    raise CellstageError(f"{level_one_zarr}: kept patch {i} cannot be read ({type(e).__name__}: {e}); "
                                         "rerun level_one") from e
                n, lab, stats, cents = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
                for k in range(1, n):
                    cx, cy = cents[k]
                    oy = int(np.clip(np.floor(cy + 0.5) - c // 2, 0, P - c))
                    ox = int(np.clip(np.floor(cx + 0.5) - c // 2, 0, P - c))
                    win = (slice(oy, oy + c), slice(ox, ox + c))
                    bg = img[win]
                    cell = lab[win] == k
                    store.add(bg=bg, nobg=bg * mask[win][..., None], masks=cell)
                    for key, v in (("patch", pid), ("y", py + cy), ("x", px + cx), ("y0", py + oy), ("x0", px + ox),
                                   ("area", stats[k, cv2.CC_STAT_AREA]), ("compactness", central_compactness(cell))):
                        rows[key].append(v)
            store.close()
            root.attrs.update({"slide": str(slide), "crop_size": c, "background": 0})
            values = np.asarray(rows["compactness"], dtype=float)
            table = pd.DataFrame({
                "slide": str(slide), "crop": np.arange(len(values), dtype=np.int64),
                "patch": np.asarray(rows["patch"], dtype=np.int64),
                "y": np.asarray(rows["y"], dtype=float), "x": np.asarray(rows["x"], dtype=float),
                "y0": np.asarray(rows["y0"], dtype=np.int64), "x0": np.asarray(rows["x0"], dtype=np.int64),
                "area": np.asarray(rows["area"], dtype=np.int64), "compactness": values,
                "kept": keep_compact(values, int(seed), min_separation=float(min_separation)),
            })
            table.to_parquet(tp, index=False)
    finally:
        patches.close()
        masks.close()
    log.info("Level Two %s: %d cell crops, %d kept in %.1f s", slide, len(table), int(table["kept"].sum()),
             time.perf_counter() - t0)
    return table


# --------------------------------------------------------------------------- Level Three
class _Rows:
    """``seq[i]`` = ``reader[rows[i]]``: chosen items of a store, read on access."""

    def __init__(self, reader, rows: np.ndarray):
        self.reader, self.rows = reader, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.reader[int(self.rows[i])]


def grade_level_two(model_dir, level_two_zarr, level_two_parquet, out_parquet, *, threshold: float,
                    batch_size: int = 256, device: str | None = None) -> pd.DataFrame:
    """Level Three: the grader (:func:`cellstage.reduce.grader.load_grader`) on the Level Two kept
    crops, ``bg`` variant. Table (slide, crop, p_unsuitable, keep = p_unsuitable < ``threshold``),
    one row per Level Two kept crop, written to ``out_parquet``."""
    import torch
    from torch.utils.data import DataLoader

    from ..crops.store import CropStoreReader
    from ..training.data import ArrayCropDataset
    from ..training.fit import predict_proba
    from ..training.transforms import grader_transform
    from .grader import load_grader

    if not 0.0 <= threshold <= 1.0:
        raise CellstageError(f"Level Three: threshold={threshold} must lie in [0, 1] (p_unsuitable cut-off)")
    table = pd.read_parquet(level_two_parquet)
    missing = {"slide", "crop", "kept"} - set(table.columns)
    if missing:
        raise CellstageError(f"{level_two_parquet}: missing column(s) {sorted(missing)}: not a Level Two table")
    kept = table[table["kept"]]
    net, meta = load_grader(model_dir)
    reader = CropStoreReader(level_two_zarr, "bg")
    try:
        if len(reader) != len(table):
            raise CellstageError(f"{level_two_zarr} holds {len(reader)} crops but {level_two_parquet} lists "
                                 f"{len(table)}: the two are from different runs, rerun level_two")
        size = int(meta["img_size"])
        if tuple(reader.shape[1:3]) != (size, size):
            raise CellstageError(f"Level Three: crops of {level_two_zarr} are {reader.shape[1]}x{reader.shape[2]} px "
                                 f"but the grader in {model_dir} was trained on {size}x{size} px crops")
        ds = ArrayCropDataset(_Rows(reader, kept["crop"].to_numpy()),
                              transform=grader_transform(meta["mean"], meta["std"], augment=False))
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        p = predict_proba(net, DataLoader(ds, batch_size=int(batch_size), shuffle=False), dev, n_classes=2)
        p = p[:, 1].numpy().astype(np.float32)
    finally:
        reader.close()
    out = pd.DataFrame({"slide": kept["slide"].astype(str).to_numpy(), "crop": kept["crop"].to_numpy(np.int64),
                        "p_unsuitable": p, "keep": p < float(threshold)})
    with atomic_path(out_parquet) as tmp:
        out.to_parquet(tmp, index=False)
    return out


# --------------------------------------------------------------------------- Table 2
def aml_reduction_table(level_tables: dict, sheet: pd.DataFrame, tasks: list[str], min_crops: int) -> pd.DataFrame:
    """Seed 003 Table 2: per level and task, the pixels removed against the original selection.

    ``level_tables``: level name (of :data:`LEVELS`) → one row per slide with columns ``slide``,
    ``selection_px`` (pixel count of the slide's kept Level One tiles, "the original WSI
    selection"), ``n_images`` and ``image_px``. Pixels are counted per image: Level One kept
    patches × patch_size², Level Two kept crops × crop_size², Level Three crops the grader keeps
    × crop_size² (overlapping crops count twice, as images do).
    ``sheet``: indexed by slide, one column per task; a missing/empty value = no label.

    Slides counted for a task at a level: those with a label for the task that have a table at
    that level; at Levels Two and Three only those with >= ``min_crops`` images at that level
    ("WSIs for which less than 100 cell crops were found are not considered", §3).
    ``reduction_pct`` = 100 × (1 − Σ image_px / Σ selection_px) over the counted slides (NaN when
    none). Note: Table 2's own figures fit no single denominator (Level One 157,142 × 512² at 84.5 %
    and Level Two 710,944 × 80² at 98.2 % imply ≈ 2.6e11 px, Level Three 142,270 × 80² at 99.9 %
    ≈ 9e11 px), so this is our reading of "compared to the original WSI selection".

    Returns one row per (level, task): level, task, n_slides, n_images, selection_px, image_px,
    reduction_pct (:func:`table2_layout` gives the paper's wide layout).
    """
    unknown = set(level_tables) - set(LEVELS)
    if unknown:
        raise CellstageError(f"aml_reduction_table: unknown level(s) {sorted(unknown)} (expected {LEVELS})")
    missing = [t for t in tasks if t not in sheet.columns]
    if missing:
        raise CellstageError(f"aml_reduction_table: task(s) {missing} are not columns of the label sheet "
                             f"({list(sheet.columns)})")
    out = []
    for level in (lv for lv in LEVELS if lv in level_tables):
        t = level_tables[level]
        need = {"slide", "selection_px", "n_images", "image_px"} - set(t.columns)
        if need:
            raise CellstageError(f"aml_reduction_table: {level} table lacks column(s) {sorted(need)}")
        if level != "Level One":
            t = t[t["n_images"] >= int(min_crops)]
        for task in tasks:
            lab = sheet[task]
            labelled = set(lab.index[lab.notna() & lab.astype(str).str.strip().ne("")].astype(str))
            sel = t[t["slide"].astype(str).isin(labelled)]
            px, img = int(sel["selection_px"].sum()), int(sel["image_px"].sum())
            out.append({"level": level, "task": task, "n_slides": int(len(sel)), "n_images": int(sel["n_images"].sum()),
                        "selection_px": px, "image_px": img,
                        "reduction_pct": 100.0 * (1.0 - img / px) if px else float("nan")})
    return pd.DataFrame(out, columns=["level", "task", "n_slides", "n_images", "selection_px", "image_px",
                                      "reduction_pct"])


def table2_layout(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout of :func:`aml_reduction_table`: rows = levels, columns (task, Reduction /
    #Images), reduction as "84.5%"."""
    wide = table.assign(Reduction=table["reduction_pct"].map(lambda v: "-" if np.isnan(v) else f"{v:.1f}%"),
                        **{"#Images": table["n_images"]})
    wide = wide.pivot(index="level", columns="task", values=["Reduction", "#Images"]).swaplevel(axis=1)
    tasks = list(dict.fromkeys(table["task"]))
    levels = [lv for lv in LEVELS if lv in set(table["level"])]
    return wide.reindex(index=levels, columns=pd.MultiIndex.from_product([tasks, ["Reduction", "#Images"]]))


def _one_slide(path, columns, what: str) -> pd.DataFrame:
    t = pd.read_parquet(path)
    missing = set(columns) - set(t.columns)
    if missing:
        raise CellstageError(f"{path}: missing column(s) {sorted(missing)}: not a {what} table")
    slides = t["slide"].astype(str).unique()
    if len(slides) > 1:
        raise CellstageError(f"{path}: holds slides {sorted(slides)}; one {what} table per slide expected")
    return t


def aml_reduction_from_files(level1_parquets, level2_parquets, level3_parquets, labels: dict, tasks: list[str],
                             min_crops: int, crop_size: int, patch_size: int) -> pd.DataFrame:
    """:func:`aml_reduction_table` from the per-slide tables of :func:`level_one`, :func:`level_two`
    and :func:`grade_level_two` (an empty list leaves that level out). ``labels``: slide → {task:
    class}. The slide of a table is its ``slide`` column (a table without rows — no crop — has no
    slide and adds nothing); Levels Two and Three take ``selection_px`` from the slide's Level One
    table."""
    rows1 = []
    for p in level1_parquets:
        t = _one_slide(p, ("slide", "kept", "selection_px"), "Level One")
        if len(t):
            n = int(t["kept"].sum())
            rows1.append({"slide": str(t["slide"].iat[0]), "selection_px": int(t["selection_px"].iat[0]), "n_images": n,
                          "image_px": n * int(patch_size) ** 2})
    l1 = pd.DataFrame(rows1, columns=["slide", "selection_px", "n_images", "image_px"])
    dup = l1["slide"][l1["slide"].duplicated()].tolist()
    if dup:
        raise CellstageError(f"aml_reduction_from_files: slide(s) {dup} have more than one Level One table")
    selection = dict(zip(l1["slide"], l1["selection_px"]))
    tables = {"Level One": l1} if len(level1_parquets) else {}
    for level, paths, column, what in (("Level Two", level2_parquets, "kept", "Level Two"),
                                       ("Level Three", level3_parquets, "keep", "Level Three")):
        if not len(paths):
            continue
        rows = []
        for p in paths:
            t = _one_slide(p, ("slide", column), what)
            if not len(t):
                continue
            s = str(t["slide"].iat[0])
            if s not in selection:
                raise CellstageError(f"{p}: slide {s!r} has no Level One table among level1_parquets "
                                     "(its selection pixel count comes from there)")
            n = int(t[column].sum())
            rows.append({"slide": s, "selection_px": selection[s], "n_images": n, "image_px": n * int(crop_size) ** 2})
        tables[level] = pd.DataFrame(rows, columns=["slide", "selection_px", "n_images", "image_px"])
    sheet = pd.DataFrame.from_dict({str(k): dict(v) for k, v in labels.items()}, orient="index")
    sheet = sheet.reindex(columns=list(tasks))
    return aml_reduction_table(tables, sheet, list(tasks), int(min_crops))

