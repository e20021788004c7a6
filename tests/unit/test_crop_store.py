"""The crop store layout: what the streaming writer writes, zarr-python reads back, and the
fast reader returns the same crops as zarr-python (also for stores in another layout)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr

from cellstage.crops.store import CropStoreReader, CropStoreWriter, create_crop_arrays


def _crops(n, size, seed=0):
    rng = np.random.default_rng(seed)
    images = (rng.integers(0, 6, (n, size, size, 3)) * 40).astype(np.uint8)
    masks = rng.random((n, size, size)) > 0.6
    return images, images * masks[..., None], masks


def _write(path, images, masked, masks, *, shard, batch):
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    writer = CropStoreWriter(path, create_crop_arrays(root, len(images), images.shape[1], shard=shard))
    for a in range(0, len(images), batch):
        writer.add(images=images[a:a + batch], masked=masked[a:a + batch], masks=masks[a:a + batch])
    writer.close()


def test_writer_output_is_read_back_identically_by_zarr_across_shards_and_a_partial_last_shard(tmp_path):
    images, masked, masks = _crops(203, 12)
    _write(tmp_path / "c.zarr", images, masked, masks, shard=64, batch=50)  # 4 shards, last has 11
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert root["images"].shards == (64, 12, 12, 3) and root["images"].chunks == (1, 12, 12, 3)
    assert np.array_equal(root["images"][:], images)
    assert np.array_equal(root["masked"][:], masked)
    assert np.array_equal(root["masks"][:], masks)
    assert len(list((tmp_path / "c.zarr" / "images").glob("c.*"))) == 4


def test_fast_reader_returns_the_crops_zarr_returns_in_random_order(tmp_path):
    images, masked, masks = _crops(150, 10, seed=1)
    _write(tmp_path / "c.zarr", images, masked, masks, shard=32, batch=7)
    rows = np.random.default_rng(2).integers(0, 150, 300)
    for name, ref in (("images", images), ("masked", masked), ("masks", masks)):
        r = CropStoreReader(tmp_path / "c.zarr", name)
        assert r._zarr is None, "the store's own layout takes the fast path"
        assert r.shape == ref.shape and r.dtype == ref.dtype
        assert all(np.array_equal(r[int(i)], ref[i]) for i in rows[:50])
        assert np.array_equal(r.take(rows), ref[rows])
        r2 = pickle.loads(pickle.dumps(r))  # as a DataLoader worker gets it
        assert np.array_equal(r2[149], ref[149])
        with pytest.raises(IndexError):
            r[150]


def test_reader_falls_back_to_zarr_for_an_unsharded_store(tmp_path):
    images = _crops(70, 8)[0]
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=3)
    g.create_array("images", data=images, chunks=(64, 8, 8, 3))
    r = CropStoreReader(tmp_path / "old.zarr", "images")
    assert r._zarr is not None
    assert np.array_equal(r[65], images[65]) and np.array_equal(r.take([69, 0, 69]), images[[69, 0, 69]])


def test_a_crop_count_short_of_the_array_is_an_error_not_a_silent_hole(tmp_path):
    images, masked, masks = _crops(20, 8)
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w", zarr_format=3)
    writer = CropStoreWriter(tmp_path / "c.zarr", create_crop_arrays(root, 20, 8, shard=8))
    writer.add(images=images[:15], masked=masked[:15], masks=masks[:15])
    with pytest.raises(Exception, match="wrote 15 of 20"):
        writer.close()
