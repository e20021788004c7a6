"""Registration QC: a magenta/green overlay PNG and the result JSON.

The overlay PNG is embedded in the ``snakemake --report`` HTML (one per registered slide), so it
is written small: its longest side capped at ``OVERLAY_MAX_PNG_SIDE`` px and stored as an
optimised ``OVERLAY_COLORS``-colour palette PNG (the overlay has only grey, magenta and green
tones): on the demo ~110 KB instead of 1.15 MB (800 px full colour), fringes still visible.
The demo's seven overlays then take ~1 MB of the HTML report, whose own scripts are ~3.3 MB.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from ..utils import save_capped_png, write_json
from .homography import RegistrationResult, read_at_downsample, to_gray

__all__ = ["OVERLAY_COLORS", "OVERLAY_MAX_PNG_SIDE", "overlay_image", "overlay_png", "save_capped_png", "save_result"]

OVERLAY_MAX_PNG_SIDE = 512  # px, longest side of the written overlay PNG
OVERLAY_COLORS = 32  # palette size of the written overlay PNG


def overlay_image(ref, mov, H: np.ndarray, max_side: int = 1024) -> np.ndarray:
    """RGB uint8 overlay in the mov frame (low-res): ref warped through H in magenta, mov in green.

    Where the two agree the tissue looks grey/white; misalignment shows as coloured fringes.
    """
    mw, mh = (int(v) for v in mov.dimensions)
    rw, rh = (int(v) for v in ref.dimensions)
    d_m = max(1.0, max(mw, mh) / max_side)
    img_m, S_m = read_at_downsample(mov, d_m)
    # ref at about the same physical resolution as the mov display image
    s = _scale(H, rw, rh)
    d_r = max(1.0, d_m / s) if np.isfinite(s) and s > 0 else max(1.0, max(rw, rh) / max_side)
    img_r, S_r = read_at_downsample(ref, d_r)
    M = np.linalg.inv(S_m) @ np.asarray(H, np.float64) @ S_r  # ref-display → mov-display
    g_m = to_gray(img_m, clahe=True)
    g_r = cv2.warpPerspective(
        to_gray(img_r, clahe=True), M, (g_m.shape[1], g_m.shape[0]), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )
    valid = cv2.warpPerspective(
        np.ones(img_r.shape[:2], np.uint8), M, (g_m.shape[1], g_m.shape[0]),
        flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    ).astype(bool)
    g_m = _stretch(g_m, valid)
    g_r = _match_hist(g_r, g_m, valid)  # stain differences should not read as misalignment
    return np.dstack([g_r, g_m, g_r])


def _scale(H, rw, rh) -> float:
    H = np.asarray(H, np.float64)
    from .homography import local_scale_rotation

    return local_scale_rotation(H, (rw - 1) / 2, (rh - 1) / 2)[0]


def _match_hist(src: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Grey-level histogram matching of src to ref, both uint8, over the ``valid`` overlap."""
    if not valid.any():
        return src
    s_cdf = np.cumsum(np.bincount(src[valid], minlength=256)).astype(np.float64)
    r_cdf = np.cumsum(np.bincount(ref[valid], minlength=256)).astype(np.float64)
    lut = np.searchsorted(r_cdf / r_cdf[-1], s_cdf / s_cdf[-1]).clip(0, 255).astype(np.uint8)
    out = lut[src]
    out[~valid] = 0
    return out


def _stretch(g: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Contrast stretch with percentiles taken over the overlap of both images."""
    nz = g[valid]
    if nz.size == 0:
        return g
    lo, hi = np.percentile(nz, [1, 99.5])
    if hi <= lo:
        return g
    return np.clip((g.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def overlay_png(ref, mov, result: RegistrationResult, path: str | os.PathLike,
                max_side: int = 1024, title: str | None = None, max_png_side: int = OVERLAY_MAX_PNG_SIDE) -> None:
    """Write the QC overlay (ref → mov frame, magenta/green), inliers and RMSE in the title;
    rendered from a ``max_side`` px overlay, written at most ``max_png_side`` px wide or high
    (:func:`save_capped_png`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rgb = overlay_image(ref, mov, result.H, max_side=max_side)
    h, w = rgb.shape[:2]
    # drawn at 100 dpi at about the size it is written (text stays legible; one resampling)
    dpi, band = 100, 0.6  # title band, inches
    fw = max_png_side / dpi / max(1.0, h / max(w, 1) + band * dpi / max_png_side)
    fh = fw * h / max(w, 1) + band
    fig = Figure(figsize=(fw, fh), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, (fh - band) / fh))
    ax.imshow(rgb, interpolation="antialiased")
    ax.set_axis_off()
    rmse_um = f"{result.rmse_um:.2f} µm" if result.rmse_um is not None else "n/a µm"
    head = title or ""
    status = "OK" if result.ok else "FAILED"
    text = (f"{head}{' – ' if head else ''}{status}: "
            f"{result.n_inliers}/{result.n_matches} inliers, "
            f"RMSE {result.rmse_px:.2f} px ({rmse_um}), scale {result.scale:.3f}, "
            f"rot {result.rotation_deg:.1f}°")
    fig.text(0.5, 1 - 0.2 / fh, text, ha="center", va="center", fontsize=7,
             color="black" if result.ok else "red")
    if result.message and not result.ok:
        fig.text(0.5, 1 - 0.42 / fh, result.message, ha="center", va="center", fontsize=6, color="red")
    fig.canvas.draw()
    save_capped_png(np.asarray(fig.canvas.buffer_rgba()), path, max_side=max_png_side, colors=OVERLAY_COLORS)


def save_result(result: RegistrationResult, json_path: str | os.PathLike) -> None:
    """Write ``result.to_dict()`` atomically (contract: results/registration/{mov_slide}.json, one per moving slide)."""
    write_json(json_path, result.to_dict())
