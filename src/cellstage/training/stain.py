"""Stain augmentation (HED jitter) and per-slide Macenko stain normalisation.

Why (seed 000 §1): "in many laboratories, tissue sections are stained manually, which introduces
the risk of colour variability due to manual biases" (Fig. 2c shows the staining differences), and
§4.3 (visualisation): "all approaches have difficulties to cluster the same cell type with vastly
different staining intensities, indicating an impact on the classification task". The paper does
not say whether it used stain augmentation or normalisation; both are off by default (config
``finetune.augment`` / ``pretrain.augment``), so default runs are unchanged.

* :class:`HEDJitter` — colour augmentation in haematoxylin-eosin-DAB space (Tellez et al. 2018,
  "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference"): RGB ->
  HED with scikit-image's Ruifrok-Johnston matrices (``skimage.color.hed_from_rgb``), per stain
  channel ``s' = s * (1 + alpha) + beta`` with ``alpha ~ U(-sigma, sigma)``, ``beta ~ U(-bias,
  bias)``, back to RGB. The conversion is the exact inverse pair of ``rgb2hed``/``hed2rgb`` but
  without ``rgb2hed``'s clipping of negative concentrations, so ``sigma = bias = 0`` is the
  identity (up to uint8 rounding). A torchvision-style callable: PIL image, (H, W, 3) array or
  (3, H, W) tensor in, the same type out; random numbers from the global torch RNG (seeded
  runs are reproducible; DataLoader workers get their own seeded streams).
* :func:`fit_macenko`, :class:`SlideStainNormaliser` — Macenko et al. (ISBI 2009) normalisation
  with one stain matrix per *slide*: the stain matrix and the 99th-percentile concentrations of
  a slide are estimated by ``torchstain`` (1.4.1, numpy backend, ``MacenkoNormalizer.fit``) from
  the pixels of up to ``max_crops`` of its crops (evenly spaced rows of the slide in its crop
  store, the unmasked ``images`` array, all-black pixels ignored), and each crop is mapped to a
  reference: concentrations ``C = pinv(HE_slide) · OD``, scaled by ``maxC_ref / maxC_slide``,
  re-coloured with ``HE_ref``. torchstain's own ``normalize`` re-estimates the matrix per image,
  which on an 80×80 crop with one nucleus is unstable; fitting per slide and applying the linear
  map ourselves is what "per slide" needs. The reference is torchstain's built-in one (the
  method's default H&E target) or a fitted slide named in config.

  Memory and reproducibility: a fit reads at most ``max_crops`` crops (256 × 80×80×3 = 5 MB) per
  slide and keeps two small matrices; it is deterministic (no random sampling: it depends only on
  the crop store), so fine-tuning and pretraining, which read the same crop stores, compute the
  same mapping without sharing a file. The fitted matrices are written into each run's record
  (``metrics.json`` → ``stain``) so they can be inspected and compared.

The stain model is H&E's; seed 000's slides are PAS-stained with a haematoxylin counterstain
(§3.1). Macenko fits both stain vectors from the data, so the second vector becomes the PAS
magenta; the HED jitter's fixed matrix treats magenta mostly as "E" (and a little "D"), which is
still a plausible stain-intensity perturbation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..utils import CellstageError

_LOG_ADJUST = float(np.log(1e-6))


# skimage.color.rgb_from_hed (rows: H, E, DAB optical-density vectors), written out so that the ml
# environment needs no scikit-image; tests/unit/test_stain.py compares it with scikit-image's
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def _np_rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    return (np.log(np.maximum(rgb, 1e-6)) / _LOG_ADJUST) @ HED_FROM_RGB


def _np_hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    return np.clip(np.exp((hed * _LOG_ADJUST) @ RGB_FROM_HED), 0.0, 1.0)


def _as_numpy(fn, x):
    # numpy (one thread, ~0.2 ms per 80x80 crop) rather than torch ops, whose intra-op threads make
    # such small transforms 10-100x slower on busy CPUs
    if isinstance(x, torch.Tensor):
        return torch.from_numpy(fn(x.detach().cpu().numpy().astype(np.float64))).to(x.device)
    return fn(np.asarray(x, dtype=np.float64))


def rgb_to_hed(rgb):
    """(..., 3) RGB in [0, 1] -> (..., 3) HED stain concentrations (``skimage.color.rgb2hed``
    without its clipping at 0). numpy array or tensor in, the same (float64) out."""
    return _as_numpy(_np_rgb_to_hed, rgb)


def hed_to_rgb(hed):
    """Inverse of :func:`rgb_to_hed`: (..., 3) HED -> RGB in [0, 1] (``skimage.color.hed2rgb``)."""
    return _as_numpy(_np_hed_to_rgb, hed)


def _per_channel(value, name: str) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=torch.float64).flatten()
    if v.numel() == 1:
        v = v.repeat(3)
    if v.numel() != 3 or bool((v < 0).any()):
        raise CellstageError(f"hed_jitter.{name}: expected a number >= 0 or three (H, E, D), got {value!r}")
    return v


class HEDJitter:
    """Random stain-intensity jitter in HED space (see the module docstring).

    ``sigma``: half-width of the multiplicative factor ``alpha`` (one number, or three for H, E,
    D); ``bias``: half-width of the additive ``beta``; ``p``: probability that an image is
    jittered at all. Per call it draws ``u ~ U(0, 1)`` (applied if ``u < p``), then 3 values for
    alpha and 3 for beta, from the global torch RNG.
    """

    def __init__(self, sigma=0.05, bias=0.05, p: float = 1.0) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise CellstageError(f"hed_jitter.p: expected a probability in [0, 1], got {p!r}")
        self.sigma = _per_channel(sigma, "sigma")
        self.bias = _per_channel(bias, "bias")
        self.p = float(p)

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> HEDJitter | None:
        """``{p, sigma, bias}`` (config ``*.augment.hed_jitter``) -> a jitter, or None when p is 0."""
        if not cfg or float(cfg.get("p", 0.0)) <= 0.0:
            return None
        return cls(sigma=cfg.get("sigma", 0.05), bias=cfg.get("bias", 0.05), p=float(cfg["p"]))

    def __repr__(self) -> str:
        return f"HEDJitter(sigma={self.sigma.tolist()}, bias={self.bias.tolist()}, p={self.p})"

    def jitter_hwc(self, rgb, alpha, beta):
        """(..., 3) RGB in [0, 1] (array or tensor) with given per-channel ``alpha``, ``beta`` ->
        jittered RGB (float64, same kind)."""
        a = np.asarray(alpha, dtype=np.float64)
        b = np.asarray(beta, dtype=np.float64)
        return _as_numpy(lambda x: _np_hed_to_rgb(_np_rgb_to_hed(x) * (1.0 + a) + b), rgb)

    def __call__(self, img):
        if torch.rand(()) >= self.p:
            return img
        alpha = ((torch.rand(3, dtype=torch.float64) * 2 - 1) * self.sigma).numpy()
        beta = ((torch.rand(3, dtype=torch.float64) * 2 - 1) * self.bias).numpy()
        return self._apply(img, alpha, beta)

    def _apply(self, img, alpha, beta):
        from PIL import Image

        if isinstance(img, Image.Image):
            return Image.fromarray(self._apply(np.asarray(img.convert("RGB")), alpha, beta))
        if isinstance(img, np.ndarray):
            if img.ndim != 3 or img.shape[-1] != 3:
                raise ValueError(f"HEDJitter: expected an (H, W, 3) array, got shape {img.shape}")
            if img.dtype == np.uint8:
                y = self.jitter_hwc(img / 255.0, alpha, beta)
                return np.rint(y * 255.0).astype(np.uint8)
            return self.jitter_hwc(img, alpha, beta).astype(img.dtype)
        if isinstance(img, torch.Tensor):
            if img.ndim < 3 or img.shape[-3] != 3:
                raise ValueError(f"HEDJitter: expected a (..., 3, H, W) tensor, got shape {tuple(img.shape)}")
            hwc = img.detach().cpu().movedim(-3, -1).numpy()
            if img.dtype == torch.uint8:
                y = np.rint(self.jitter_hwc(hwc / 255.0, alpha, beta) * 255.0).astype(np.uint8)
            else:
                y = self.jitter_hwc(hwc, alpha, beta)
            out = torch.from_numpy(np.ascontiguousarray(np.moveaxis(y, -1, -3))).to(img.dtype).to(img.device)
            from torchvision import tv_tensors

            if isinstance(img, tv_tensors.TVTensor):  # keep torchvision's tv_tensors.Image type
                return tv_tensors.wrap(out, like=img)
            return out
        raise TypeError(f"HEDJitter: unsupported input type {type(img).__name__}")


def add_hed_jitter(transform, jitter: HEDJitter | None):
    """Prepend ``jitter`` to a transform: to every view of a lightly ``MultiViewTransform`` (each
    view draws its own jitter), else in front of ``transform`` itself. None: unchanged."""
    if jitter is None:
        return transform
    from lightly.transforms.multi_view_transform import MultiViewTransform
    from torchvision import transforms as T

    if isinstance(transform, MultiViewTransform):
        transform.transforms = [T.Compose([jitter, v]) for v in transform.transforms]
        return transform
    return T.Compose([jitter, transform]) if transform is not None else jitter


# --------------------------------------------------------------------------- Macenko
MACENKO_IO = 240  # transmitted light intensity (Macenko / torchstain default)
MACENKO_BETA = 0.15  # optical density below which a pixel counts as background (torchstain default)
MIN_STAINED_PIXELS = 100


@dataclass(frozen=True)
class StainFit:
    """A Macenko fit: ``stain_matrix`` (3, 2) optical-density vectors of the two stains (columns,
    haematoxylin first) and ``max_conc`` (2,) their 99th-percentile concentrations."""

    stain_matrix: np.ndarray
    max_conc: np.ndarray
    n_crops: int = 0

    def to_dict(self) -> dict:
        return {"stain_matrix": np.asarray(self.stain_matrix).round(6).tolist(),
                "max_conc": np.asarray(self.max_conc).round(6).tolist(), "n_crops": int(self.n_crops)}

    @classmethod
    def from_dict(cls, d: Mapping) -> StainFit:
        return cls(np.asarray(d["stain_matrix"], float), np.asarray(d["max_conc"], float), int(d.get("n_crops", 0)))


def default_reference() -> StainFit:
    """torchstain's built-in Macenko target (``MacenkoNormalizer`` before ``fit``)."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    n = NumpyMacenkoNormalizer()
    return StainFit(np.asarray(n.HERef, float), np.asarray(n.maxCRef, float))


def fit_macenko(images: np.ndarray, *, what: str = "crops") -> StainFit:
    """Fit the Macenko stain matrix and max concentrations of ``images`` ((N, H, W, 3) uint8,
    all pixels pooled; all-black pixels — masked background — are ignored) with torchstain."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    x = np.asarray(images)
    if x.ndim < 2 or x.shape[-1] != 3:
        raise CellstageError(f"{what}: expected (..., 3) RGB crops for the Macenko fit, got shape {x.shape}")
    px = x.reshape(-1, 3)
    px = px[px.max(axis=1) > 0]
    # torchstain keeps pixels whose optical density is >= 0.15 in every channel (not background)
    n_stained = int((-np.log((px.astype(np.float64) + 1.0) / MACENKO_IO) >= MACENKO_BETA).all(axis=1).sum())
    if n_stained < MIN_STAINED_PIXELS:
        raise CellstageError(f"{what}: Macenko fit failed: {n_stained} stained pixels (optical density >= "
                             f"{MACENKO_BETA} in R, G and B), need {MIN_STAINED_PIXELS}; are the crops blank?")
    n = NumpyMacenkoNormalizer()
    try:
        with np.errstate(all="ignore"):
            n.fit(px.reshape(-1, 1, 3), Io=MACENKO_IO, beta=MACENKO_BETA)
    except (ValueError, IndexError, np.linalg.LinAlgError) as e:
        raise CellstageError(f"{what}: Macenko fit failed ({e}); too few stained pixels?") from e
    he, mx = np.asarray(n.HERef, float), np.asarray(n.maxCRef, float)
    if not (np.isfinite(he).all() and np.isfinite(mx).all()) or (mx <= 0).any():
        raise CellstageError(f"{what}: Macenko fit failed (too few stained pixels: {len(px)} non-black pixels, "
                             "need tissue darker than the light level 240)")
    return StainFit(he, mx, n_crops=len(x) if x.ndim == 4 else 1)


def macenko_map(images: np.ndarray, source: StainFit, reference: StainFit) -> np.ndarray:
    """Map uint8 RGB ``images`` (..., 3) stained like ``source`` to ``reference`` (see module
    docstring). All-black pixels (masked background) stay black."""
    x = np.asarray(images)
    shape = x.shape
    px = x.reshape(-1, 3).astype(np.float64)
    od = -np.log((px + 1.0) / MACENKO_IO)
    conc = np.linalg.pinv(source.stain_matrix) @ od.T  # (2, n)
    conc *= (reference.max_conc / source.max_conc)[:, None]
    out = MACENKO_IO * np.exp(-reference.stain_matrix @ conc)
    out = np.clip(np.round(out.T), 0, 255).astype(np.uint8)
    out[x.reshape(-1, 3).max(axis=1) == 0] = 0
    return out.reshape(shape)


class SlideStainNormaliser:
    """Per-slide Macenko mapping to one reference: ``normaliser(images, slide)``.

    ``fits``: slide -> :class:`StainFit`; ``reference``: the target fit, ``reference_name`` its
    origin (a slide name or ``"torchstain-default"``).
    """

    def __init__(self, fits: Mapping[str, StainFit], reference: StainFit, reference_name: str) -> None:
        self.fits = dict(fits)
        self.reference = reference
        self.reference_name = reference_name

    @classmethod
    def from_sources(cls, sources: Sequence[tuple[str, str]], *, reference_slide: str | None = None,
                     max_crops: int = 256) -> SlideStainNormaliser:
        """Fit every slide of the (crops zarr, index parquet) ``sources`` from up to ``max_crops``
        evenly spaced crops of that slide (its ``images`` array). ``reference_slide``: the fitted
        slide every slide is mapped to (None: torchstain's default reference)."""
        import pandas as pd

        from ..crops.store import CropStoreReader

        fits: dict[str, StainFit] = {}
        for zarr_path, index_path in sources:
            idx = pd.read_parquet(index_path, columns=["row", "slide"])
            todo = [(s, g) for s, g in idx.groupby(idx["slide"].astype(str), sort=True) if s not in fits]
            if not todo:
                continue
            reader = CropStoreReader(zarr_path, "images")  # unmasked crops, whatever the variant
            try:
                for slide, g in todo:
                    rows = np.unique(g["row"].to_numpy(np.int64))
                    if len(rows) > max_crops:
                        rows = rows[np.linspace(0, len(rows) - 1, max_crops).round().astype(np.int64)]
                    fits[slide] = fit_macenko(reader.take(rows), what=f"{zarr_path} slide {slide}")
            finally:
                reader.close()
        if reference_slide is None:
            return cls(fits, default_reference(), "torchstain-default")
        if str(reference_slide) not in fits:
            raise CellstageError(f"augment.macenko_reference: slide {reference_slide!r} is not among the crop "
                                 f"sources' slides {sorted(fits)}; name one of them or null (built-in reference)")
        return cls(fits, fits[str(reference_slide)], str(reference_slide))

    def __call__(self, images: np.ndarray, slide: str) -> np.ndarray:
        fit = self.fits.get(str(slide))
        if fit is None:
            raise CellstageError(f"Macenko normalisation: slide {slide!r} was not fitted (known: {sorted(self.fits)})")
        return macenko_map(images, fit, self.reference)

    def to_dict(self) -> dict:
        return {"method": "macenko", "reference": self.reference_name,
                "reference_fit": self.reference.to_dict(),
                "slides": {s: f.to_dict() for s, f in sorted(self.fits.items())}}


def stain_options(augment: Mapping | None, sources: Sequence[tuple[str, str]]
                  ) -> tuple[HEDJitter | None, SlideStainNormaliser | None]:
    """Config ``*.augment`` (``{hed_jitter: {p, sigma, bias}, macenko, macenko_reference}``) ->
    (jitter for the training transform or None, per-slide normaliser of ``sources``' slides or None).

    A trainer passes the jitter to :func:`add_hed_jitter` / ``train_transform(hed_jitter=)`` and
    the normaliser as ``stain=`` to its crop datasets (:mod:`cellstage.training.data`)."""
    augment = augment or {}
    unknown = set(augment) - {"hed_jitter", "macenko", "macenko_reference"}
    if unknown:
        raise CellstageError(f"augment: unknown keys {sorted(unknown)} (known: hed_jitter, macenko, "
                             "macenko_reference)")
    jitter = HEDJitter.from_config(augment.get("hed_jitter"))
    stain = None
    if augment.get("macenko"):
        stain = SlideStainNormaliser.from_sources(list(sources), reference_slide=augment.get("macenko_reference"))
    return jitter, stain
