import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests run on 2 cores; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cellpose_model(tmp_path_factory) -> str:
    """A Cellpose model file: ``CELLSTAGE_CELLPOSE_MODEL`` when set, else one trained here from
    scratch on a synthetic section (no weights can be downloaded; ~1-2 min on 2 cores). Its
    accuracy is not the point where it is used (tiling vs one piece, throughput), but an
    untrained net finds no nuclei, so it is trained for real."""
    p = os.environ.get("CELLSTAGE_CELLPOSE_MODEL")
    if p:
        if not Path(p).is_file():
            raise FileNotFoundError(f"CELLSTAGE_CELLPOSE_MODEL={p} is not a file")
        return p
    from cellstage.demo.render import render_section
    from cellstage.segment.train import train_segmenter

    sec = render_section(3, size=768, n_tubules=2, tubule_radius=(150.0, 200.0))
    out = tmp_path_factory.mktemp("cellpose") / "model"
    train_segmenter([sec.image], [sec.labels], out, epochs=120, nimg_per_epoch=16, batch_size=4, max_eval_tiles=2)
    return str(out)


class StopTraining(Exception):
    """Raised at the first batch of an epoch by :func:`stop_in_epoch`."""


@pytest.fixture
def stop_in_epoch(monkeypatch):
    """``stop_in_epoch(fn, epoch)``: call ``fn()`` and stop its training with an exception at the
    first batch of ``epoch`` (0-based), leaving the checkpoint files a kill at that moment leaves
    (epochs ``0..epoch-1`` done). A finished run keeps no checkpoint, so resuming is tested on an
    interrupted one."""
    from cellstage.training import resume

    def run(fn, epoch: int):
        def hook(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == epoch and batch_idx == 0:
                raise StopTraining(f"stopped in epoch {epoch}")

        monkeypatch.setattr(resume.EpochCheckpoint, "on_train_batch_end", hook, raising=False)
        try:
            with pytest.raises(StopTraining):
                fn()
        finally:
            monkeypatch.delattr(resume.EpochCheckpoint, "on_train_batch_end", raising=False)

    return run
