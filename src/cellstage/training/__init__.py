"""cellstage.training: the one Lightning layer every trainer uses.

* :mod:`.fit` — :func:`~.fit.fit_resumable` (Trainer, resume, per-epoch checkpoint, reseeding,
  devices, deterministic flag) and the shared ``predict_proba`` loop;
* :mod:`.resume` — seeds, ``EpochSampler``, ``EpochCheckpoint``, ``find_resumable``,
  ``CheckpointedPlateau``, ``device_kwargs``, ``resolve_deterministic``;
* :mod:`.callbacks` — ``History``, ``BestState``, ``LossHistory``;
* :mod:`.folds` — ``make_folds``; :mod:`.data` — crop datasets and ``CropDataModule``;
* :mod:`.transforms` — augmentations and ``channel_stats``; :mod:`.backbones` — timm backbones.

Adding a trainer means writing a LightningModule and its data (a data module or a loader), and
calling :func:`~.fit.fit_resumable`. Submodules are imported on use (torch/Lightning are heavy).
"""
