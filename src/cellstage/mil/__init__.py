"""cellstage.mil: seed 003's multi-instance learning (MIL) and patient-wise cross-validation.

Seed 003 §2 (MIL head) and §3 (training: Adam lr 0.001, 10 epochs Level One, 30 epochs Level
Two/Three, 32 images per input stack reshuffled every epoch, 5-fold patient-wise CV, slides with
< 100 crops skipped, near-uniform classes in the binary tasks), Tables 3–8 (per-fold training and
validation loss/accuracy).

* :mod:`.bags` — per-slide instances in zarr stores, the per-epoch bag plan, the bag dataset;
* :mod:`.models` — timm backbones (incl. the paper's modified ResNet18) and the MIL head;
* :mod:`.train` — the LightningModule (slide-level validation);
* :mod:`.folds` — patient-wise folds with near-uniform classes;
* :mod:`.stage` — ``train_mil_fold`` and ``assign_patient_folds``, the workflow entry points;
* :mod:`.tables` — Tables 3–8 from many ``metrics.json``.

Submodules are imported on use (torch/Lightning are heavy).
"""
