"""Cross-scan positives (issue 12 item 5): a cell's crops on two scans are the two views."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_ssl import write_crop_source

from cellstage.config import is_cross_scan, partner_scan
from cellstage.ssl import METHODS, pretrain
from cellstage.ssl.crossscan import CrossScanDataset, pair_rows
from cellstage.training.data import ZarrCropDataset, load_index
from cellstage.utils import CellstageError


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("xscan")
    own = write_crop_source(d, n=24, size=40, slide="s1_40x", seed=0)
    partner = write_crop_source(d, n=24, size=20, slide="s1_20x", seed=1)  # other pixels, same cells
    return own, partner


def test_pairs_are_matched_on_section_and_cell(scans):
    own, partner = (load_index([s]) for s in scans)
    partner = partner.iloc[::-1].iloc[:20]  # another order; 4 cells without a 20x crop
    rows, pos = pair_rows(own, partner)
    assert len(rows) == 20
    assert (partner.reset_index(drop=True).loc[pos, "cell_id"].to_numpy() == rows["cell_id"].to_numpy()).all()
    other_section = partner.assign(section="s9")
    with pytest.raises(CellstageError, match="none of the 24 crops"):
        pair_rows(own, other_section)


def test_odd_views_come_from_the_partner_scan(scans):
    from lightly.transforms.multi_view_transform import MultiViewTransform
    from torchvision import transforms as T

    own_idx, partner_idx = (load_index([s]) for s in scans)
    rows, pos = pair_rows(own_idx, partner_idx)
    to_tensor = T.ToTensor()
    ds = CrossScanDataset(ZarrCropDataset(rows), ZarrCropDataset(partner_idx), pos,
                          MultiViewTransform([to_tensor, to_tensor, to_tensor]))
    views, _, label = ds[3]
    assert [tuple(v.shape) for v in views] == [(3, 40, 40)] * 3 and label == -1
    own = torch.from_numpy(ZarrCropDataset(rows).image(3)).permute(2, 0, 1).float() / 255
    assert torch.allclose(views[0], own) and torch.allclose(views[2], own)
    assert not torch.allclose(views[1], own)  # the 20x crop, upsampled to 40 px
    with pytest.raises(CellstageError, match="two or more views"):
        CrossScanDataset(ZarrCropDataset(rows), ZarrCropDataset(partner_idx), pos, to_tensor)


def test_cross_scan_pretraining_records_its_partner(scans, tmp_path):
    own, partner = scans
    assert METHODS["simclr_xscan"].cross_scan and not METHODS["simclr"].cross_scan
    res = pretrain("simclr_xscan", "resnet18", [own], tmp_path / "x", img_size=40, epochs=1, batch_size=8,
                   progress=False, seed=0, partner_sources=[partner])
    assert res["n_crops"] == 24 and np.isfinite(res["final_loss"])
    info = json.loads((tmp_path / "x" / "pretrain.json").read_text())
    assert info["config"]["partner_sources"] == [list(partner)]
    with pytest.raises(CellstageError, match="no partner crops"):
        pretrain("simclr_xscan", "resnet18", [own], tmp_path / "y", img_size=40, epochs=1, progress=False)
    with pytest.raises(CellstageError, match="not a cross-scan method"):
        pretrain("simclr", "resnet18", [own], tmp_path / "z", img_size=40, epochs=1, progress=False,
                 partner_sources=[partner])


def test_partner_scan_from_config():
    assert is_cross_scan("dino_xscan") and not is_cross_scan("dino")
    assert partner_scan("20x", ["40x", "20x"], {}) == "40x"
    assert partner_scan("20x", ["40x", "20x", "10x"], {"20x": "10x"}) == "10x"
    with pytest.raises(CellstageError, match="pretrain.partner_scan.20x"):
        partner_scan("20x", ["40x", "20x", "10x"], {})
    with pytest.raises(CellstageError, match="pretrain.partner_scan.20x: '20x'"):
        partner_scan("20x", ["40x", "20x"], {"20x": "20x"})
