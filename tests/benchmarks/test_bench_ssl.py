"""Benchmark: SimCLR pretraining throughput of cellstage's loop vs a bare lightly + timm loop
(issue 12, item 8), and the share of cellstage's step time spent waiting for data.

Data: ``N_CROPS`` demo crops (80 px, the 40x crop size of config/config.yaml) cut around the
nuclei of sections rendered by :func:`cellstage.demo.render.render_section`, written in the
crop store layout of the pipeline (:mod:`cellstage.crops.store`) with an index parquet.

Both arms train resnet18 (timm, ``num_classes=0``) + lightly's ``SimCLRProjectionHead`` +
``NTXentLoss(0.5)`` with AdamW (lr 1e-3, weight decay 0.05), batch ``BATCH``, the same views
(lightly's ``SimCLRTransform`` with cellstage's defaults, :mod:`cellstage.ssl.simclr`), the
same number of steps (``EPOCHS`` epochs of ``N_CROPS // BATCH``), ``NUM_WORKERS`` loader
workers (0, as the workflow's ``pretrain`` rule runs it), on the CPU with 2 threads:

* **cellstage**: what :func:`cellstage.ssl.pretrain.pretrain` builds — ``ZarrCropDataset`` over
  the crop store (one pread + decode per crop), ``EpochSampler``, the ``SimCLR`` LightningModule
  (``SSLModule``: per-step loss logging, epoch history, plateau scheduler) — fitted by
  :func:`cellstage.training.fit.fit_resumable` (Lightning Trainer, ``ReseedEveryEpoch``, the
  atomic ``EpochCheckpoint`` after every epoch, deterministic algorithms on CPU), plus one timing
  callback. ``pretrain`` takes no callbacks, so the bench builds the same pieces itself; a short
  warm-up run goes through ``pretrain`` itself;
* **bare**: the crops in memory as a uint8 array, a plain ``Dataset`` (PIL image -> views),
  ``DataLoader(shuffle=True, drop_last=True)``, ``loss = NTXent(m(x0), m(x1)); zero_grad;
  backward; step``.

Timing, interleaved step by step (the 2 cores are shared, and load changes within seconds;
whole runs one after the other gave ratios that moved with the load): after each cellstage
step (``on_train_batch_end``) the timing callback runs one step of the bare loop (its batch
fetch included; a new iterator at the end of each of its epochs) and stamps its start and end.
cellstage's time is the wall time from the end of its step ``WARMUP`` to the end of its last
step minus the bare steps run in between: its steps, Lightning's hooks, and at the epoch ends
the reseeding, the history and the checkpoint write (the Trainer's set-up and tear-down are
not in it). The bare loop's time is the sum of its steps ``WARMUP + 1 ..``. crops/s = timed
steps × batch / time. Goal: cellstage >= 0.9x the bare loop.

Data wait (cellstage): per step, the time from the previous step's end (after the bare step
run there), or from ``on_train_epoch_start`` for an epoch's first step, to this step's
``on_train_batch_start`` — Lightning fetching the batch from the DataLoader (crop reads, views,
collation) and moving it to the device — summed over the timed steps and divided by
cellstage's time above. Written as ``ratio = fraction / 1.0`` (anchor: the whole timed step
time); goal ``<= 0.10``. The fraction depends on the load: the views cost ~85 ms of CPU per
step of 32 crops against ~1.15 s of CPU for the step's compute (1 thread): an estimated ~11-12 % of a
step on 2 quiet cores with ``num_workers=0``, but ~2 % measured while other jobs shared the
cores (contention slows the 2-thread compute far more than the 1-thread views).

Sizes (env): ``BENCH_SSL_CROPS`` (384), ``BENCH_SSL_BATCH`` (32), ``BENCH_SSL_EPOCHS`` (3),
``BENCH_SSL_WORKERS`` (0): 2 × 36 steps + a 2-step warm-up, about 1.5 min on 2 quiet cores
(11-12 min measured while 3-4 other trainings shared the 2 cores).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from _bench import write_result

N_CROPS = int(os.environ.get("BENCH_SSL_CROPS", "384"))
BATCH = int(os.environ.get("BENCH_SSL_BATCH", "32"))
EPOCHS = int(os.environ.get("BENCH_SSL_EPOCHS", "3"))
NUM_WORKERS = int(os.environ.get("BENCH_SSL_WORKERS", "0"))
WARMUP = 2  # steps at the start of each arm not timed
CROP = 80  # config/config.yaml scans.40x.crop_size
BACKBONE = "resnet18"
SEED = 0


# --------------------------------------------------------------------------- demo crops
def write_demo_crops(root: Path, n: int, size: int = CROP) -> tuple[str, str, np.ndarray]:
    """``n`` crops of ``size`` px around the nuclei of rendered demo sections (1536², 3 tubules),
    written as a crop store + index parquet (pool split ``unlabelled``). Returns (zarr, parquet,
    the crops as an (n, size, size, 3) uint8 array)."""
    import zarr

    from cellstage.crops.extract import INDEX_COLUMNS, window_origin
    from cellstage.crops.store import CropStoreWriter, create_crop_arrays
    from cellstage.demo.render import render_section

    crops, masks, rows = [], [], []
    seed = 0
    while len(crops) < n:
        sec = render_section(seed, size=1536, n_tubules=3)
        img = np.pad(sec.image, ((size, size), (size, size), (0, 0)), constant_values=235)
        lab = np.pad(sec.labels, ((size, size), (size, size)))
        for nuc in sec.nuclei:
            if len(crops) == n:
                break
            x0 = int(window_origin(nuc.x, size)) + size
            y0 = int(window_origin(nuc.y, size)) + size
            crops.append(img[y0 : y0 + size, x0 : x0 + size])
            masks.append(lab[y0 : y0 + size, x0 : x0 + size] == nuc.id)
            rows.append((f"demo{seed}", nuc.x, nuc.y))
        seed += 1
    images, masks = np.stack(crops), np.stack(masks)
    zpath, ipath = root / "demo_40x.zarr", root / "demo_40x.parquet"
    group = zarr.open_group(str(zpath), mode="w", zarr_format=3)
    writer = CropStoreWriter(zpath, create_crop_arrays(group, n, size))
    writer.add(images=images, masked=images * masks[..., None], masks=masks)
    writer.close()
    section, cx, cy = (np.asarray(c) for c in zip(*rows))
    index = pd.DataFrame(
        {
            "row": np.arange(n),
            "cell_id": np.arange(1, n + 1),
            "slide": "demo_40x",
            "section": section,
            "scan": "40x",
            "patient": "p1",
            "split": "unlabelled",
            "label": "",
            "label_idx": -1,
            "centroid_x": cx,
            "centroid_y": cy,
            "distance_to_wall_um": np.nan,
            "distance_norm": np.nan,
            "anchor": "nucleus",
            "mask_source": "segmentation",
        }
    )[INDEX_COLUMNS]
    index.to_parquet(ipath, index=False)
    return str(zpath), str(ipath), images


# --------------------------------------------------------------------------- bare loop
class _Views(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i]))


class BareLoop:
    """Plain torch SimCLR: DataLoader -> timm backbone + lightly projection head -> NTXentLoss ->
    AdamW, one step per :meth:`step` (a new loader iterator when the last one is exhausted)."""

    def __init__(self, images: np.ndarray) -> None:
        import timm
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform
        from torch.utils.data import DataLoader

        from cellstage.ssl.simclr import TRANSFORM_DEFAULTS

        torch.manual_seed(SEED)
        backbone = timm.create_model(BACKBONE, pretrained=False, num_classes=0)
        head = SimCLRProjectionHead(backbone.num_features, backbone.num_features, 128)
        self.model = torch.nn.Sequential(backbone, head).train()
        self.criterion = NTXentLoss(temperature=0.5)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        transform = SimCLRTransform(input_size=CROP, **TRANSFORM_DEFAULTS)
        self.loader = DataLoader(
            _Views(images, transform),
            batch_size=BATCH,
            shuffle=True,
            drop_last=len(images) > BATCH,
            num_workers=NUM_WORKERS,
            persistent_workers=NUM_WORKERS > 0,
        )
        self._it = None
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.waits: list[float] = []
        self.loss = float("nan")

    def step(self) -> None:
        t0 = time.perf_counter()
        try:
            x0, x1 = next(self._it)
        except (StopIteration, TypeError):  # end of an epoch, or the first step
            self._it = iter(self.loader)
            x0, x1 = next(self._it)
        t1 = time.perf_counter()
        loss = self.criterion(self.model(x0), self.model(x1))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.loss = float(loss.detach())
        self.starts.append(t0)
        self.waits.append(t1 - t0)
        self.ends.append(time.perf_counter())


# --------------------------------------------------------------------------- cellstage loop
class InterleavedClock(L.Callback):
    """Stamps cellstage's steps (end, data wait) and runs one bare step after each of them."""

    def __init__(self, bare: BareLoop) -> None:
        self.bare = bare
        self.ends: list[float] = []
        self.waits: list[float] = []
        self.boundaries: list[float] = []
        self._mark = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        if self._mark is not None:  # the previous epoch's end: hooks, history, checkpoint, reseed
            self.boundaries.append(now - self._mark)
        self._mark = now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.waits.append(time.perf_counter() - self._mark)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.bare.step()
        self._mark = time.perf_counter()


def run_cellstage(source: tuple[str, str], out_dir: Path, callback: L.Callback, *, epochs: int) -> dict:
    """SimCLR through the pieces of ``cellstage.ssl.pretrain.pretrain`` + ``fit_resumable``."""
    from torch.utils.data import DataLoader

    from cellstage.ssl import METHODS
    from cellstage.training.data import ZarrCropDataset, load_index
    from cellstage.training.fit import fit_resumable
    from cellstage.training.resume import EpochSampler, loader_generator, resolve_deterministic, seed_all

    spec = METHODS["simclr"]
    dataset = ZarrCropDataset(load_index([source]), variant="images", transform=spec.make_transform(CROP))
    seed_all(SEED)
    model = spec.module(BACKBONE, CROP)
    model.val_seed = SEED
    bs = int(min(BATCH, len(dataset)))
    loader = DataLoader(
        dataset,
        batch_size=bs,
        sampler=EpochSampler(len(dataset), SEED),
        drop_last=len(dataset) > bs,
        num_workers=NUM_WORKERS,
        persistent_workers=NUM_WORKERS > 0,
        generator=loader_generator(SEED),
    )
    fit_resumable(
        model,
        train_loader=loader,
        ckpt_path_last=out_dir / "last.ckpt",
        resume_config={"bench": "ssl", "dir": str(out_dir)},
        epochs=epochs,
        seed=SEED,
        accelerator="cpu",
        devices=1,
        deterministic=resolve_deterministic(None, "cpu"),
        callbacks=[callback],
        progress=False,
        checkpoint_every=1,
        default_root_dir=out_dir,
        what="bench simclr",
    )
    assert len(model.history) == epochs and np.isfinite(model.history[-1]["loss"])
    return {"steps_per_epoch": len(loader), "final_loss": model.history[-1]["loss"]}


# --------------------------------------------------------------------------- the bench
def test_bench_ssl_simclr_throughput_and_data_wait(tmp_path):
    from cellstage.ssl import pretrain

    torch.set_num_threads(2)
    zpath, ipath, images = write_demo_crops(tmp_path, N_CROPS)

    # warm-up, not timed: the real entry point, 2 steps
    res = pretrain(
        "simclr",
        BACKBONE,
        [(zpath, ipath)],
        tmp_path / "pretrain",
        img_size=CROP,
        epochs=1,
        batch_size=BATCH,
        max_crops=2 * BATCH,
        seed=SEED,
        accelerator="cpu",
        num_workers=NUM_WORKERS,
        progress=False,
    )
    assert res["steps_per_epoch"] == 2 and np.isfinite(res["final_loss"])

    bare = BareLoop(images)
    clock = InterleavedClock(bare)
    cs = run_cellstage((zpath, ipath), tmp_path / "cellstage", clock, epochs=EPOCHS)
    assert cs["steps_per_epoch"] == len(bare.loader) == N_CROPS // BATCH
    n = EPOCHS * cs["steps_per_epoch"]
    assert len(clock.ends) == len(bare.ends) == n > WARMUP + 1

    ends, waits = np.asarray(clock.ends), np.asarray(clock.waits)
    b_start, b_end, b_wait = np.asarray(bare.starts), np.asarray(bare.ends), np.asarray(bare.waits)
    # bare steps inside cellstage's timed window: those after cellstage's steps WARMUP .. n-1
    inside = (b_start >= ends[WARMUP - 1]) & (b_end <= ends[-1])
    t_cs = ends[-1] - ends[WARMUP - 1] - float((b_end - b_start)[inside].sum())
    t_bare = float((b_end - b_start)[WARMUP:].sum())
    steps = n - WARMUP
    cs_rate, bare_rate = steps * BATCH / t_cs, steps * BATCH / t_bare
    wait_cs, wait_bare = float(waits[WARMUP:].sum() / t_cs), float(b_wait[WARMUP:].sum() / t_bare)
    print(
        f"\n[bench] ssl: {N_CROPS} demo crops {CROP} px, batch {BATCH}, {EPOCHS} epochs x "
        f"{cs['steps_per_epoch']} steps ({steps} timed per arm, interleaved), {NUM_WORKERS} workers, "
        f"{torch.get_num_threads()} threads: cellstage {t_cs / steps:.3f} s/step, data wait {wait_cs:.1%}; "
        f"epoch ends {[round(b, 2) for b in clock.boundaries]} s; bare {t_bare / steps:.3f} s/step, data wait "
        f"{wait_bare:.1%}; final losses "
        f"{cs['final_loss']:.3f} / {bare.loss:.3f}"
    )

    rec = write_result(
        "ssl_simclr_throughput",
        cs_rate,
        "crops/s",
        f"bare lightly+timm torch loop: same {N_CROPS} demo crops, views, batch {BATCH}, {BACKBONE}, "
        f"{steps} timed steps, interleaved step by step in the same run",
        bare_rate,
        ">=",
        0.9,
    )
    wait = write_result(
        "ssl_simclr_data_wait",
        wait_cs,
        "fraction of step time",
        f"cellstage's whole timed step time (= 1); the bare loop's own fraction {wait_bare:.3f} "
        f"(num_workers {NUM_WORKERS})",
        1.0,
        "<=",
        0.10,
    )
    assert rec["ratio"] > 0 and 0 <= wait["ratio"] <= 1
